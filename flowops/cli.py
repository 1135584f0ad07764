"""The ``flowops`` command: info, demo / train, bench."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from . import _backend

    data = _backend.info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"flowops {__import__('flowops').__version__}  torch {data['torch']}  threads {data['threads']}")
    print(f"forced backend : {data['forced']}  (FLOWOPS_BACKEND or flowops.set_backend)")
    for name in ("cpp", "triton", "cuda"):
        entry = data[name]
        mark = "yes" if entry["available"] else "no "
        print(f"{name:<6} {mark}  {entry['detail']}")
    print(f"CPU tensors run on : {data['cpu_tensors']}")
    print(f"CUDA tensors run on: {data['cuda_tensors']}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flowops", description="Fused kernels for normalizing flows.")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="which backends are available, and why not")
    p_info.add_argument("--json", action="store_true")
    sub.add_parser("demo", help="the 2-moons RealNVP example end to end, compared with the reference-op model", add_help=False)
    sub.add_parser("train", help="train a flow: 'flowops train moons --help'", add_help=False)
    sub.add_parser("bench", help="benchmark ops against the eager and compiled reference", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return _info(parser.parse_args(argv))
    if cmd == "demo":
        from . import train

        return train.main(["demo", *rest])
    if cmd == "train":
        from . import train

        return train.main(rest)
    if cmd == "bench":
        from . import benchmark

        return benchmark.main(rest)
    parser.error(f"unknown command {cmd!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
