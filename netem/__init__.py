"""Link and wireless-channel emulation shared by the virtual and wall clocks.

- `LinkProfile`, `DuplexProfile` (netem.profile): what a link does, in SI units;
  `from_dict` reads scenario units (rate_mbps, delay_ms, ...).
- `Link(profile, seed)` (netem.link): `send(nbytes, t_send) -> arrival time or None`, the
  model both clocks use; `link_seed(seed, device, direction)` keys one link.
- `netem.channel`: Shannon rate, link budget, block fading. `netem.trace`: CSV traces.
- `get_profile(name)`, `list_profiles()` (netem.profiles): bundled named profiles.
- `netem.transport.ShapedSender`: wall-clock shaping of real (ZeroMQ) sends.
- `netem.tc`: Linux tc kernel backend (root, network namespaces).

Imports only numpy/pyzmq and the standard library; never policies, agents or testbed.
"""

from netem.channel import ChannelProcess, ChannelProfile, shannon_rate
from netem.link import Delivery, Link, LinkStats, link_seed
from netem.profile import DuplexProfile, LinkProfile, gilbert_elliott_loss
from netem.profiles import get_profile, list_profiles
from netem.trace import Trace, list_traces, load_trace, parse_trace

__all__ = [
    "ChannelProcess",
    "ChannelProfile",
    "Delivery",
    "DuplexProfile",
    "Link",
    "LinkProfile",
    "LinkStats",
    "Trace",
    "get_profile",
    "gilbert_elliott_loss",
    "link_seed",
    "list_profiles",
    "list_traces",
    "load_trace",
    "parse_trace",
    "shannon_rate",
]
