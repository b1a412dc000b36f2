"""Training: resumable state (safetensors + JSON), the step loop with its JSON-lines log and
learning curves, options from dataclasses, and the recipes of the shipped checkpoints."""
