"""foobar_lb: an asyncio HTTP and TCP load balancer.

    from foobar_lb import LoadBalancer

    async with LoadBalancer("foobar.toml") as lb:
        print(lb.url())
"""

__version__ = "0.1.0"

from . import config as _config
from .balancing import Algorithm, Balancer, algorithm_names, register_algorithm
from .config import Config, ConfigError
from .runtime import ListenError, LoadBalancer, new_event_loop
from .servers import Server, State


# The configuration readers, validating `balance` against every registered algorithm (the
# config module itself is pure data and is told the names).
def config_from_dict(data, source=None) -> Config:
    return _config.config_from_dict(data, source, algorithm_names())


def parse_config(text, source=None) -> Config:
    return _config.parse_config(text, source, algorithm_names())


def load_config(path) -> Config:
    return _config.load_config(path, algorithm_names())


def quick_config(bind, backends, mode="http", algorithm="roundrobin") -> Config:
    return _config.quick_config(bind, backends, mode, algorithm, algorithm_names())

__all__ = [
    "Algorithm",
    "Balancer",
    "Config",
    "ConfigError",
    "ListenError",
    "LoadBalancer",
    "Server",
    "State",
    "__version__",
    "algorithm_names",
    "config_from_dict",
    "load_config",
    "new_event_loop",
    "parse_config",
    "quick_config",
    "register_algorithm",
]
