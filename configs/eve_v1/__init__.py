"""The EVEv1 recipe, one config per stage: `python -m evejax.recipe --config=configs/eve_v1`."""
