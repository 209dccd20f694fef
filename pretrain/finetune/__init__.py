"""Adapting a trained model to sessions it has never seen (popscale finetune): unit
identification or full fine-tuning, on a label budget, with model selection on validation.
Imports pretrain.run and the layers below it."""
