"""The torch.optim-compatible front end."""
