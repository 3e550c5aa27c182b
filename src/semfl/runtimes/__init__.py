"""Runtimes: transports that carry a method's requests to users (local, forked workers, Flower) and the runner that binds a method to one."""
