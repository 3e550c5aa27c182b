"""The Flower App components named in pyproject.toml ([tool.flwr.app.components])."""
from semfl.runtimes.flower.node import make_client_app
from semfl.runtimes.flower.server import make_server_app

client_app = make_client_app()
server_app = make_server_app()
