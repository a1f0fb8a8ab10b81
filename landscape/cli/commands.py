"""Subcommands, grouped by pipeline stage; each module has ``register(subparsers)``."""

from . import critical, demo, directions, export, finetune, fisher, hessian, plots, schedule, surface, where


def register_all(subparsers):
    # Order is the pipeline's, so `landscape --help` reads as the workflow.
    for module in (fisher, directions, surface, hessian, critical, plots, export, schedule, finetune, demo, where):
        module.register(subparsers)
