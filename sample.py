"""Sample from a GPT: ``python sample.py --ckpt PATH [--prompt TEXT] ...``.

The sampler (KV-cache generation, few-shot prompting, in-context evaluation, attention maps)
arrives with issue #6. Until then this entry point loads a model directory and reports it.
"""

import argparse
import sys

from gpt import GPT


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", required=True, help="an exported model/ or Hugging Face GPT-2 directory"
    )
    args = parser.parse_args(argv)
    try:
        model = GPT.from_pretrained(args.ckpt)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"sample.py: error: {err}\n")
    print(f"loaded {args.ckpt}: {model.num_params():,} parameters")
    print("generation arrives with issue #6 (sampler); nothing was sampled")


if __name__ == "__main__":
    main(sys.argv[1:])
