"""Run fuzz cases of one area in this process (tests/test_fuzz.py runs it as a subprocess, so
that a crash or a hang is seen as one).

    python tests/fuzz_runner.py --area matmul --seed 0 --count 200 --log /tmp/cases.log
    python tests/fuzz_runner.py --area matmul --case '{"N": 3, ...}'

Each case's spec is written to the log, flushed, before it runs: if the process dies, the last
line names the case. The result is one JSON line on stdout: the number of cases run and the
failures, each with its spec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_compute  # noqa: E402
import fuzz_quant  # noqa: E402
import fuzz_train  # noqa: E402
import torch  # noqa: E402
from fuzz_support import Mismatch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

AREAS = {
    "quantize_4bit": (fuzz_quant.quantize_4bit_spec, fuzz_quant.check_quantize_4bit),
    "dequantize_4bit": (fuzz_quant.dequantize_4bit_spec, fuzz_quant.check_dequantize_4bit),
    "blockwise_8bit": (fuzz_quant.blockwise_8bit_spec, fuzz_quant.check_blockwise_8bit),
    "from_dict": (fuzz_quant.from_dict_spec, fuzz_quant.check_from_dict),
    "matmul_4bit": (fuzz_compute.matmul_spec, fuzz_compute.check_matmul),
    "lora_4bit": (fuzz_compute.lora_spec, fuzz_compute.check_lora),
    "modules": (fuzz_compute.module_spec, fuzz_compute.check_module),
    "optim": (fuzz_train.optim_spec, fuzz_train.check_optim),
    "load_adapter": (fuzz_train.adapter_spec, fuzz_train.check_adapter),
}


def run_one(area: str, spec: dict) -> str | None:
    """None if the case gave one of the two accepted outcomes, else what it gave."""
    check = AREAS[area][1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check(spec)
    except Mismatch as e:
        return f"wrong result: {e}"
    except Exception as e:  # noqa: BLE001 - an exception where a result was due is the finding
        tb = traceback.format_exception(type(e), e, e.__traceback__, limit=-3)
        return f"unexpected {type(e).__name__}: {str(e)[:400]} | {''.join(tb)[-600:]}"


def run_area(area: str, seed_value: int, count: int, log) -> dict:
    strategy = AREAS[area][0]
    failures, ran = [], [0]

    @seed(seed_value)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy())
    def case(spec):
        ran[0] += 1
        log.write(json.dumps(spec) + "\n")
        log.flush()
        err = run_one(area, spec)
        if err is not None:
            failures.append({"spec": spec, "error": err})

    case()
    return {"area": area, "cases": ran[0], "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--area", required=True, choices=sorted(AREAS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--log", default=os.devnull)
    ap.add_argument("--case", help="run this one spec (JSON) instead of drawing cases")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # cases are small; several areas may run at once
    if args.case:
        err = run_one(args.area, json.loads(args.case))
        out = {"area": args.area, "cases": 1, "failures": [] if err is None else [err]}
    else:
        with open(args.log, "w") as log:
            out = run_area(args.area, args.seed, args.count, log)
    print(json.dumps(out))
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
