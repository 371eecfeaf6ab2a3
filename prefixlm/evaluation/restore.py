"""Rebuild a trained Llama from a run directory, for evaluation, export and the benchmarks.

It sits in ``evaluation/`` rather than ``run/`` because it needs the model: ``run/checkpoint``
stores and restores pytrees and never imports the model, so training's state store stays below
the model code it saves.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from prefixlm.config import model_config
from prefixlm.model import attention
from prefixlm.model import llama as model_lib
from prefixlm.run import workdir as workdir_lib
from prefixlm.run.checkpoint import restore_params


def load_model(workdir, step: int | None = None):
    """(config, model, step): the newest (or given) checkpoint's parameters as a Llama.

    The one way evaluation, export and the benchmarks rebuild a trained model: restores only the
    ``params`` item (no optimizer, no data) onto the first local device.
    """
    config = workdir_lib.load_config(workdir)
    mcfg = model_config(config)
    try:  # a kernel of the training hardware (cudnn, splash) may not run here: pick this one's
        attention.resolve(mcfg.attention, jax.default_backend())
    except ValueError:
        mcfg = dataclasses.replace(mcfg, attention="auto")
    graphdef, abstract_state = model_lib.abstract_split(mcfg)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_state))
    params, step = restore_params(workdir, target, step)
    return config, nnx.merge(graphdef, params), step
