"""The Flower transport: ServerApp and ClientApp around semfl's methods, the wire format, and `semfl deploy`."""
