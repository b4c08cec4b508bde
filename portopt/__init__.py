"""portopt: optimizers written once as equations, run on any device, proven consistent."""

__version__ = "0.1.0"
