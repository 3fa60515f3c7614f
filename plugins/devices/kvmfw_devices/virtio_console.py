"""virtio-console over virtio-mmio: one port, the guest's hvc0 (virtio 1.1, 5.3 "Console").

Device ID 3, queue 0 receiveq (host -> guest, device-writable buffers), queue 1 transmitq
(guest -> host, device-readable buffers). No features beyond VERSION_1 are offered, so the
configuration space (cols, rows, max_nr_ports, emerg_wr) reads zero and there is no
control queue. Output and input use the same console plumbing as the UARTs
(:mod:`kvmfw_devices.console`); host input waits (up to :data:`PENDING_LIMIT` bytes) until
the guest posts receive buffers. Transmitted bytes go to the output straight from views of
guest RAM, in chunks of at most :data:`OUTPUT_CHUNK` bytes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from kvmfw.device import ConfigKey, DeviceContext
from kvmfw.errors import CheckpointError

from kvmfw_devices import KVMFW_PLUGIN_API as KVMFW_PLUGIN_API  # checked by the core
from kvmfw_devices.console import OUTPUT_KEY, ConsoleInput, ConsoleOutput, input_key
from kvmfw_devices.virtio_mmio import Buffer, VirtioMmio

VIRTIO_ID_CONSOLE = 3
RECEIVEQ = 0
TRANSMITQ = 1
CONFIG_SIZE = 12
PENDING_LIMIT = 1 << 20
OUTPUT_CHUNK = 64 << 10


class VirtioConsole(VirtioMmio):
    """A virtio serial console with one port."""

    name: ClassVar[str] = "virtio-console"
    device_id: ClassVar[int] = VIRTIO_ID_CONSOLE
    num_queues: ClassVar[int] = 2
    config: ClassVar[dict[str, ConfigKey]] = {
        **VirtioMmio.config,
        "output": OUTPUT_KEY,
        "input": input_key("none"),
    }

    def __init__(self, ctx: DeviceContext, **params: Any) -> None:
        self.pending = bytearray()
        super().__init__(ctx, **params)
        self.stats.update(tx_bytes=0, rx_bytes=0)
        self.output = ConsoleOutput(ctx, self.params["output"])
        self.input = ConsoleInput(ctx, self.params["input"], self.enqueue, name=self.name)

    def config_bytes(self) -> bytes:
        return bytes(CONFIG_SIZE)

    def enqueue(self, data: bytes) -> None:
        """Host bytes for the guest: delivered as soon as receive buffers are posted."""
        room = PENDING_LIMIT - len(self.pending)
        self.pending += data[:max(room, 0)]
        self._deliver()

    def _deliver(self) -> None:
        while self.pending:
            chain = self.pop_chain(RECEIVEQ)
            if chain is None:
                return
            head, bufs = chain
            written = self.scatter(bufs, self.pending)
            del self.pending[:written]
            self.stats["rx_bytes"] += written
            self.push_used(RECEIVEQ, head, written)

    def notify(self, index: int) -> None:
        if index == RECEIVEQ:
            self._deliver()
        else:
            self.process_queue(index)

    def handle_chain(self, index: int, buffers: list[Buffer]) -> int:
        for view in self.views(buffers, False):
            for off in range(0, len(view), OUTPUT_CHUNK):
                chunk = bytes(view[off:off + OUTPUT_CHUNK])
                self.output.write(chunk)
                self.stats["tx_bytes"] += len(chunk)
        return 0

    def device_reset(self) -> None:
        pass  # pending host input survives a driver reset

    def save(self) -> dict[str, Any]:
        self.output.flush()  # before a checkpoint or fork: written once, by this process
        return {**super().save(), "pending": bytes(self.pending).hex()}

    def restore(self, state: dict[str, Any]) -> None:
        self.output.flush()
        super().restore(state)
        text = str(state.get("pending", ""))[:2 * PENDING_LIMIT]
        try:
            pending = bytes.fromhex(text)
        except ValueError as exc:
            raise CheckpointError(f"{self.name}: bad saved input ({exc})") from None
        self.pending = bytearray(pending)

    def flush(self) -> None:
        self.output.flush()

    def after_fork(self, child: int) -> None:
        """Output to a file goes to ``<path>.<pid>``; input stays with the parent
        (:mod:`kvmfw_devices.console`)."""
        super().after_fork(child)
        self.output.after_fork(child)
        self.input.after_fork()

    def close(self) -> None:
        super().close()
        self.input.close()
        self.output.close()
