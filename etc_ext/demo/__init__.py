"""The offline demo of etc-ext (`etc-ext demo`): ETC on a tiny LLaVA trained on generated shapes VQA.

- `etc_ext.demo.recipe`: data, model sizes and the training runs behind the shipped checkpoints;
- `etc_ext.demo.reproduce`: trains every checkpoint from scratch with `etc_ext.train` and packs them in fp16
  (`python -m etc_ext.demo.reproduce --work DIR --install`);
- `etc_ext.demo.artifacts`: the shipped checkpoints (`etc_ext/demo/checkpoints/`), packing and loading;
- `etc_ext.demo.run`: `run_demo(...)`, the table, plot and json of `etc-ext demo`.
"""


def run_demo(*args, **kwargs):
    """See `etc_ext.demo.run.run_demo`."""
    from .run import run_demo as _run_demo

    return _run_demo(*args, **kwargs)


__all__ = ["run_demo"]
