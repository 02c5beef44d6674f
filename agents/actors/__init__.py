"""Ray actors: `DeviceGroup` (many virtual devices, one SLM) and `Verifier` (ZeroMQ ROUTER,
one LLM). Both wrap the transport-free cores of agents.device and agents.verifier; this
package only moves frames and, in the wall clock, waits real time.

    clock      ClockParams: the virtual and the wall clock, one code path
    group      DeviceGroup: a DEALER, the devices' state machines, one SLM
    verifier   Verifier: the ROUTER, its serving thread, one LLM
    admission  which client may open and use which session, within which limits (no sockets)
    process    a worker process's threads and memory

ZeroMQ messages are multipart: [wire frame, emulation stamp]. The wire frame is what a real
device and server would exchange (agents.protocol); the stamp carries what only an
emulation has: emulated send/arrival times and the draft probabilities x_d used to
measure beta; one type per message, agents.wire).
"""

from agents.actors.clock import ClockParams
from agents.actors.group import DeviceGroup
from agents.actors.process import max_rss_bytes, memory
from agents.actors.verifier import Verifier

__all__ = ["ClockParams", "DeviceGroup", "Verifier", "max_rss_bytes", "memory"]
