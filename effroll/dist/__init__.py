"""Scale-out on Ray: ``pool.RayRolloutPool`` and its ``workers`` (need ``pip install 'effroll[ray]'``), and the
front door ``front.AdaptiveSpecRollout`` (``workers=N``), which imports them only when asked to."""
