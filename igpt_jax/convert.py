r"""Imports the released iGPT weights (OpenAI's TF checkpoints or transformers' ImageGPT) and
exports ours to transformers' format.

  python -m igpt_jax.convert --source=hf --input=DIR --workdir=OUT
  python -m igpt_jax.convert --source=openai --input=PREFIX --palette=kmeans_centers.npy \
      --workdir=OUT
  python -m igpt_jax.convert --to=hf --workdir=RUN --output=DIR

Importing writes OUT/checkpoints/0 (an orbax train state with a fresh optimizer state),
OUT/palette.npy and OUT/config.json, which `evaluate`, `sample` and `main` (fine-tuning from it)
use unchanged with `--config=OUT/config.py`, also written. The conversions themselves, and
`logits_fn` for Python use, are in `igpt_jax/weights.py`.
"""

import ml_collections
from absl import flags

from igpt_jax import checkpointing
from igpt_jax import cli
from igpt_jax import errors
from igpt_jax import weights

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, ["hf", "openai"], "Import from this format.")
flags.DEFINE_string("input", None, "hf: save_pretrained directory; openai: checkpoint prefix.")
flags.DEFINE_string("palette", None, "openai: kmeans_centers.npy.")
flags.DEFINE_integer("num_heads", 0, "openai: heads (0: from the released sizes).")
flags.DEFINE_string("workdir", None, "The run directory to write (import) or read (export).")
flags.DEFINE_enum("to", None, ["hf"], "Export the run in --workdir to this format.")
flags.DEFINE_string("output", None, "--to=hf: directory to write.")
flags.DEFINE_bool("overwrite", False, "Import into a --workdir that holds a run, moving its "
                  "files to replaced.<time>/ inside it first.")
cli.define_distributed_flags(flags)
flags.mark_flags_as_required(["workdir"])


def convert(f) -> str:
  """Does what the flags `f` ask; returns what was written."""
  if f.to and f.source:
    raise errors.FlagError(f"--source={f.source} (import) and --to={f.to} (export) ask for "
                           "two conversions; pass one of them.")
  if f.to == "hf":
    if not f.output:
      raise errors.FlagError("--to=hf needs --output=DIR (the directory to write).")
    saved = checkpointing.saved_config(f.workdir)
    if saved is None:
      raise errors.MissingError(f"{f.workdir} has no config.json: it holds no run. Pass the "
                                "--workdir of a trained or imported run.")
    return weights.export_hf(f.workdir, f.output, ml_collections.ConfigDict(saved))
  if f.source and not f.input:
    raise errors.FlagError(f"--source={f.source} needs --input=PATH (hf: a save_pretrained "
                           "directory; openai: the checkpoint prefix).")
  if f.source == "hf":
    return weights.import_hf(f.input, f.workdir, overwrite=f.overwrite)
  if f.source == "openai":
    if not f.palette:
      raise errors.FlagError("--source=openai needs --palette=kmeans_centers.npy.")
    return weights.import_openai(f.input, f.palette, f.workdir, num_heads=f.num_heads,
                                 overwrite=f.overwrite)
  raise errors.FlagError("nothing to do: import with --source=hf|openai --input=PATH "
                         "--workdir=NEW_DIR, or export with --to=hf --workdir=RUN --output=DIR.")


def main(argv):
  cli.start(argv, FLAGS)
  cli.run_reporting_user_errors(lambda f: print(f"Wrote {convert(f)}", flush=True), FLAGS)


if __name__ == "__main__":
  cli.run(main)
