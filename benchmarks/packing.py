"""Tokenise-and-plan benchmark: tokens/s of the generate stage's token path against a bare tokenizer loop, and
the planning process's peak memory at two token budgets.

    python benchmarks/packing.py                           # synthetic corpus, byte-level tokenizer, 4M tokens
    python benchmarks/packing.py --tokens 1000000 --repeats 1 --budgets 500000 4000000

In one run, alternating, `--repeats` times each, in this process:
  bare   the same tokenizer over the same documents (the corpus's stream, batches of 256), ids counted and
         dropped, until as many tokens as the plan packs: the floor for any packing;
  plan   `_load_plan` of the generate stage without Ray (its tasks run one after another in this process):
         tokenise, pack into ctx_len chunks, write the token file in row groups, checksum it, write the plan.
Ratio = median plan tokens/s / median bare tokens/s. Then, in fresh processes (tests/memory_probe.py), the peak
resident memory of planning at each of `--budgets`: the whole process's, and what the work adds above the
process after its imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def bare_loop(cfg, tokenizer, num_tokens: int) -> float:
    """Seconds to tokenise documents of the configured corpus until `num_tokens` ids have come out."""
    from actors.generate.corpus import BATCH_DOCS, load_documents

    t, n = time.perf_counter(), 0
    for batch in load_documents(cfg.dataset).iter(batch_size=BATCH_DOCS):
        n += sum(len(ids) + 1 for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"])  # + EOS
        if n >= num_tokens:
            break
    return time.perf_counter() - t


def plan_once(folder: Path, num_tokens: int, model: str) -> tuple[float, int]:
    from actors.store.storage import ActivationStore
    from orchestrator.stages.generate import _load_plan
    from tests.memory_probe import probe_config

    cfg = probe_config(folder, num_tokens)
    t = time.perf_counter()
    plan = _load_plan(cfg, ActivationStore(folder / "acts"), model, None)
    return time.perf_counter() - t, plan["num_chunks"] * plan["ctx_len"]


def probe(folder: Path, num_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.memory_probe", "plan", str(folder), str(num_tokens)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budgets", type=int, nargs=2, default=[4_000_000, 32_000_000])
    args = p.parse_args()

    from actors.generate.models import build_local_model, load_tokenizer
    from tests.memory_probe import probe_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = probe_config(tmp, args.tokens)
        model = str(build_local_model(cfg.model.build, cfg.model.init_seed, tmp / "model"))
        tokenizer = load_tokenizer(model, None, False)
        bare, plan, packed = [], [], 0
        for r in range(args.repeats):
            bare.append(bare_loop(cfg, tokenizer, args.tokens))
            seconds, packed = plan_once(tmp / f"plan-{r}", args.tokens, model)
            plan.append(seconds)
            print(f"repeat {r + 1}: bare {bare[-1]:.2f} s, plan {plan[-1]:.2f} s", flush=True)
        memory = [probe(tmp / f"memory-{n}", n) for n in args.budgets]

    bare_rate, plan_rate = packed / statistics.median(bare), packed / statistics.median(plan)
    print(f"\nsynthetic corpus, byte-level tokenizer, ctx 128; {packed:,} tokens; medians of {args.repeats}")
    print(f"{'':40s}{'tokens/s':>12s}{'ratio vs bare':>15s}")
    print(f"{'bare tokenizer loop':40s}{bare_rate:12,.0f}{1.0:15.2f}")
    print(f"{'tokenise + pack + write + plan':40s}{plan_rate:12,.0f}{plan_rate / bare_rate:15.2f}")
    print(f"\n{'planning process, budget':40s}{'peak RSS':>12s}{'added by work':>15s}{'seconds':>10s}")
    for m in memory:
        print(f"{m['num_tokens']:40,d}{m['work_peak_rss'] / 2**20:9.0f} MiB{(m['work_peak_rss'] - m['baseline_rss']) / 2**20:11.0f} MiB"
              f"{m['seconds']:10.1f}")
    a, b = memory
    print(f"peak ratio {b['work_peak_rss'] / a['work_peak_rss']:.3f} at {b['num_tokens'] / a['num_tokens']:.0f}x the tokens")


if __name__ == "__main__":
    main()
