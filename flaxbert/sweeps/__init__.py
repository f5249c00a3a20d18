"""Sweeps: run one config at many points, each in its own workdir, then summarise and plot them.

The modules, each importing only those listed before it:

- `logs`: what a run leaves in its workdir, read back (metrics.jsonl, JSON files,
  TensorBoard event scalars).
- `points`: a config file's get_sweep points: the helpers that build them (`grid`, `zip_`,
  `product`, `concat`, `variants`), their names, and `load_sweep`, which checks every
  point's config and gives each its command line.
- `status`: whether a point is done, failed, incomplete or missing.
- `plot`: `flaxbert plot` (the curves of runs) and a sweep's summary figure.
- `summary`: a sweep's summary.csv, summary.md, summary_by_seed.csv and summary.png.
- `runner`: running the unfinished points here, some at a time (`flaxbert sweep`), or
  printing their commands (`--dry-run`).
- `slurm`: a SLURM array job with one task per point (`flaxbert sweep --emit slurm`).
- `suite`: `flaxbert evaluate-suite`, every task preset of a suite fine-tuned from each
  checkpoint (and a random baseline) as one sweep, then a leaderboard (CSV, Markdown, PNG).
- `commands`: the command lines `flaxbert sweep`, `flaxbert sweep-summary` and
  `flaxbert evaluate-suite`.
"""
