"""Training: the loop, the arms (interpolation included), packing, optimizer, checkpoints, sharding, the
memory plan, and the forgetting curve measured while an arm trains (with its forecast)."""
