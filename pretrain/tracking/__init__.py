"""Every MLflow call: runs (online, or journalled offline and synced later), the model
registry, the pyfunc flavour. Imports the layers below it, never the training run."""
