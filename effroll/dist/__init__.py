"""Scale-out: ``ray_pool.RayRolloutPool`` (needs ``pip install 'effroll[ray]'``; imported on use)."""
