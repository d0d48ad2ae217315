"""foobar_lb: an asyncio HTTP and TCP load balancer.

    from foobar_lb import LoadBalancer

    async with LoadBalancer("foobar.toml") as lb:
        print(lb.url())
"""

__version__ = "0.1.0"

from .balancing import Algorithm, Balancer, algorithm_names, register_algorithm
from .config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_config,
    quick_config,
)
from .runtime import ListenError, LoadBalancer, new_event_loop
from .servers import Server, State

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
