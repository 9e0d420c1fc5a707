"""Write finegrain's arith task as verl RL parquet files (train.parquet, test.parquet).

    python examples/verl/make_arith_data.py --out data/verl_arith [--train 2000 --test 200]

Columns follow verl's RLHFDataset: data_source, prompt (chat messages), ability,
reward_model {style, ground_truth}, extra_info {split, index, question, meta_json}. ``meta_json``
holds the example's meta (start value, operations) as JSON, which FinegrainRewardManager reads back
for the step_labels signal (finegrain/integrations/verl.py, TokenRewardScorer.trajectory).
Needs pandas and pyarrow (both come with verl).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(split: str, n: int) -> list[dict]:
    from finegrain.tasks import TASKS

    task = TASKS.get("arith")()
    out = []
    for i, ex in enumerate(task.examples(split)[:n]):
        out.append({
            "data_source": "finegrain/arith",
            "prompt": [{"role": "user", "content": ex.prompt}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ex.answer},
            "extra_info": {"split": split, "index": ex.id, "question": ex.prompt, "meta_json": json.dumps(ex.meta)},
        })
    return out


def main(argv: list[str] | None = None) -> None:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/verl_arith")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        pd.DataFrame(rows(split, n)).to_parquet(out / f"{split}.parquet")
        print(f"wrote {out / f'{split}.parquet'} ({n} rows requested)")


if __name__ == "__main__":
    main()
