"""Run by tests/test_vllm.py in the vLLM environment (`make vllm-env`): the server's engine on vLLM and on
transformers, side by side, for a run; prints each one's results as JSON."""

import json
import sys

from PIL import Image

from vlmtune.serve.engine import Engine, Job, Sampling


def main(run: str, images: list[str]) -> None:
    pictures = [Image.open(p).convert("RGB") for p in images]
    out = {}
    for engine in ("transformers", "vllm"):
        served = Engine.load({"ft": run}, None, "float32", engine)
        ft, base = served.adapter("ft"), served.adapter("tiny")
        question = served.family.format_question("how many players are there?")
        streamed: list[str] = []
        batches = [
            [Job(p, ft.prompt, ft, max_tokens=20) for p in pictures],  # captions
            [Job(pictures[0], question, ft, 3), Job(pictures[1], ft.prompt, ft, 5, on_text=streamed.append)],
            [Job(p, base.prompt, base, max_tokens=20) for p in pictures[:2]],  # the bare base
        ]
        results = [[vars(r) for r in served.run(jobs)] for jobs in batches]
        sampled = served.run([Job(pictures[0], ft.prompt, ft, 8, Sampling(temperature=1.0, top_p=0.9))])
        out[engine] = {
            "results": results,
            "streamed": "".join(streamed),
            "sampled": sampled[0].completion_tokens,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
