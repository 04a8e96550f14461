"""Building and updating routers: `train_router` from labelled outcomes, updates from feedback, the
zero-label pretrained head and calibration on unlabelled traffic. It sits above `routing`: fitting returns a
router, so it builds on the router rather than the reverse."""
