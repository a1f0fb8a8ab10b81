"""Guided dropout and fine-tuning: dropout sites, Fisher profiles, schedules, regularizers, runs.

Modules: ``sites`` (dropout sites found by module name), ``profile`` (Fisher per parameter and per
site), ``schedule`` (guided dropout schedules that really apply), ``regularizers`` (Gaussian
dropout, R3F/R4F, ...), ``metrics``, ``training`` (one fine-tuning run), ``sweep`` (data-paucity
sweeps and their summaries), and the stages as one call each: ``profile.run_profile``,
``schedule_stage.run_schedule``, ``finetune.run_finetune``.
"""
