"""Flow matching and rectified flow: straight-path generative ODEs (see ``flow_matching.py``)."""
