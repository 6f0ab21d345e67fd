"""The training library the stage jobs (jobs/pretrain.py, jobs/finetune.py) run: typed config, Ray Train + DeepSpeed loop, rows, checkpoints."""
