"""Print vlmtune's dependencies from pyproject.toml (and those of the `--extras` named), one per line, leaving
out the named packages: for an environment that pins some of them itself (the vLLM one: `make vllm-env`)."""

import argparse
import re
from pathlib import Path

import tomllib

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--extras", nargs="*", default=[], help="optional dependency groups to add")
ap.add_argument("--except", dest="left_out", nargs="*", default=[], help="package names to leave out")
args = ap.parse_args()
project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
wanted = project["dependencies"] + [
    r for extra in args.extras for r in project["optional-dependencies"][extra]
]
for requirement in wanted:
    if re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] not in args.left_out:
        print(requirement)
