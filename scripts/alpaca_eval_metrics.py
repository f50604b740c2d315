#!/usr/bin/env python
"""Print alpaca_eval's leaderboard metrics for one annotation file as one JSON object.

    python scripts/alpaca_eval_metrics.py ANNOTATIONS.json [--instruction-difficulty CSV --gamed CSV]

ANNOTATIONS.json is a JSON list in alpaca_eval's annotation format (`preference`: 1 = output_1,
the reference, wins; 2 = output_2, the model, wins; fractional = weighted; 1.5 = draw). With
alpaca_eval's `instruction_difficulty.csv` and `df_gamed.csv` (hub dataset tatsu-lab/alpaca_eval;
local paths, https:// or hf:// URLs) the length-controlled win rate is `length_controlled_v1`
(`length_controlled_winrate`); without them `length_controlled_minimal`. Row i of the annotations
is instruction i of the AlpacaEval set (alpaca_eval's convention) unless a row has an `index`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from montessori.errors import MontessoriError
from montessori.evaluation.alpaca_eval import difficulties_at, load_length_control
from montessori.evaluation.metrics import alpaca_eval_metrics
from montessori.io import read_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("annotations")
    parser.add_argument("--instruction-difficulty", help="CSV: row index -> difficulty (alpaca_eval's file)")
    parser.add_argument("--gamed", help="CSV of gamed-baseline annotations (alpaca_eval's df_gamed.csv)")
    args = parser.parse_args(argv)
    try:
        annotations = read_json(args.annotations)
        if not isinstance(annotations, list) or not annotations:
            raise MontessoriError(f"{args.annotations}: expected a non-empty JSON list of annotations")
        for index, row in enumerate(annotations):
            if not isinstance(row, dict) or "preference" not in row:
                raise MontessoriError(f"{args.annotations}: annotation {index} has no 'preference'")
        difficulty = gamed = None
        if args.instruction_difficulty or args.gamed:
            if not (args.instruction_difficulty and args.gamed):
                raise MontessoriError("length_controlled_v1 needs both --instruction-difficulty and --gamed")
            by_index, gamed = load_length_control(args.instruction_difficulty, args.gamed)
            positions = [row.get("index", position) for position, row in enumerate(annotations)]
            difficulty = difficulties_at(by_index, positions, args.instruction_difficulty)
        metrics = alpaca_eval_metrics(annotations, instruction_difficulty=difficulty, gamed=gamed)
    except (MontessoriError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
