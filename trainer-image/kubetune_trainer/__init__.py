"""The kubetune trainer: what runs inside the PyTorchJob pods and in local mode."""
