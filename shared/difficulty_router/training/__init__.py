"""Building and updating routers: `train_router` from labelled outcomes, its default operating point (shared
with the shard-trained routers of `scale`), training rows from user grades joined to a decision log (feedback)
and `train --update` on old labels plus new ones. It sits above `routing`: fitting returns a router, so it
builds on the router rather than the reverse."""
