"""Evaluation of every student: AlpacaEval 2 (`alpaca_eval`), MT-Bench (`mt_bench`), lm-eval-harness
(`lm_eval`), with the judges in `judges` and the leaderboard metrics in `metrics`."""
