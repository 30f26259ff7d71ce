"""A user reward for the vLLM trainer test: varied rewards from a random model (longer is better)."""


def length_reward(completion, item):
    return {"total": len(completion) / 100.0, "accuracy": float(len(completion) % 2)}
