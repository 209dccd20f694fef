"""The MLflow pyfunc definition of a popscale model ("models from code": MLflow copies this file
into the model and runs it at load time; nothing is pickled). Weights, config and vocabularies
come from the `model` artifact (see registry.py).

predict() takes a packed batch as the tokenizer makes it (`pretrain.model.batch.PackedBatch`, or its
`to_dict()`) and returns {readout: predictions (n, d)} on the model's common scale (the tokenizer's
`normaliser(session, behaviour, ...)` gives the shift and scale back to the session's units).
"""

import mlflow
import torch
from mlflow.pyfunc import PythonModel

from pretrain.model.batch import PackedBatch


class PopscalePyfunc(PythonModel):
    def load_context(self, context):
        # deferred: importing zarr only when used keeps start-up light
        from pretrain.tracking.export import load_exported

        self.model, self.tokenizer = load_exported(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        batch = model_input if isinstance(model_input, PackedBatch) else PackedBatch(**model_input)
        with torch.no_grad():
            out = self.model(batch.to("cpu"))
        return {k: v.numpy() for k, v in out.items()}


mlflow.models.set_model(PopscalePyfunc())
