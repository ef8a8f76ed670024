"""Conditional pre-training of the compressor on shards, kept apart from the model (nanoGPT's model/train split).

    shards.py   where shards are: run dirs, globs, URL lists; follow mode; the epoch's shard record
    stream.py   shard tars -> keyed examples -> seeded shuffle -> exact skip -> uint8 batches
    state.py    LR schedule, parameter groups, atomic checkpoints, step-keyed logs
    loop.py     the training loop shared by the single actor and every DDP worker
    actor.py    the Ray side: one trainer actor, or Ray Train DDP workers, and the driver's progress bar
"""
