"""Replication with a fixed leader: the leader's side of FETCH (:mod:`.state`) and the follower's fetchers."""
