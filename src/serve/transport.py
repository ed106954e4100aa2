"""The node's DICOM transport: pynetdicom's association server with the limits a server facing a network needs,
enforced before memory or a thread is spent on a peer.

    server = start_server(ae, ("127.0.0.1", 11112), TransportLimits(...), refuse=lambda peer, why: log(...),
                          evt_handlers=[...])

pynetdicom 3.0.4 reads a PDU's 4-byte length from its header and then reads that many bytes into memory, whatever
maximum PDU length it advertised (a header declaring 1 GB costs 1 GB, from a caller that never associated too); its
sockets have no timeout, so a peer that sends part of an A-ASSOCIATE-RQ and then a byte every few seconds holds a
thread, and one of its `maximum_associations` (10 by default), for as long as it trickles. None of this can be set
through its settings, so this module wraps its socket reader and its server:

- `GuardedConnection` wraps the socket pynetdicom's `AssociationSocket` reads from (our request handler hands it
  over in `setup`, before pynetdicom builds the association). It follows the PDU boundaries in what it hands on:
  a header declaring more than the limit (`max_pdu` for P-DATA-TF, `max_request_pdu` for any other PDU) closes the
  connection before a byte of the body is read. Every read has a deadline that data does not extend: the first
  PDU (the A-ASSOCIATE-RQ) must be whole within `association_timeout` of the connection, any later one within
  `network_timeout` of its first byte. Silence is pynetdicom's: before the first PDU its ARTIM timer
  (`association_timeout`), between PDUs its idle timer, given one second more than `network_timeout` so that a PDU
  trickled inside an association is closed by its own deadline, which names the reason.
- `GuardedServer` counts the open connections per peer address and in all, and answers one past either limit at
  once with an A-ASSOCIATE-RJ (transient, local limit exceeded) and a close, before any thread is started for it.
  A connection holds its slot until its association's thread has ended. An address that has had an association
  accepted in the last `KNOWN_SECONDS` may go past the limit in all by up to `max_per_peer` (a reserve shared by
  the known peers): strangers from many addresses can fill the node, not shut out the PACS it already serves.

Every refusal goes to `refuse(peer, reason)` (the node logs it), once per connection.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

P_DATA_TF, A_ASSOCIATE_RQ = 0x04, 0x01
MAX_CONTEXTS = 128                    # presentation contexts of one A-ASSOCIATE-RQ: the standard's most (odd IDs 1-255)
MAX_TRANSFER_SYNTAXES = 2048          # transfer syntaxes proposed in all: a sender proposes a few per context
NEGOTIATION_POLL = 0.02               # seconds between turns of a connection's reader until it is associated
KNOWN_SECONDS = 24 * 3600            # an address that had an association accepted stays known this long


@dataclass(frozen=True)
class TransportLimits:
    max_pdu: int = 16384              # bytes of a P-DATA-TF PDU: the maximum the node advertises, and enforces
    max_request_pdu: int = 256 << 10  # bytes of any other PDU (an A-ASSOCIATE-RQ lists its presentation contexts)
    association_timeout: float = 10.0  # seconds from the connection to a whole A-ASSOCIATE-RQ
    network_timeout: float = 30.0     # seconds for one later PDU, first byte to last; and of silence between PDUs
    max_connections: int = 64         # open connections in all
    max_per_peer: int = 16            # open connections from one address


class Refused(ConnectionAbortedError):
    """A connection closed by a limit (an OSError: pynetdicom's reader takes it for a closed connection)."""


def _rejection() -> bytes:
    """An A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation), local limit exceeded."""
    rj = A_ASSOCIATE_RJ()
    rj.result, rj.source, rj.reason_diagnostic = 0x02, 0x03, 0x02
    return rj.encode()


def _abort() -> bytes:
    ab = A_ABORT_RQ()
    ab.source, ab.reason_diagnostic = 0x02, 0x00
    return ab.encode()


def proposed(body: bytes) -> tuple[int, int]:
    """(presentation context items, transfer syntax sub-items) of an A-ASSOCIATE-RQ's body (after its 6-byte header:
    68 fixed bytes, then items of type, reserved, 2-byte length, value; PS3.8 9.3.2). Lengths past the end stop the
    count (pynetdicom refuses such a PDU itself)."""
    pos, contexts, syntaxes = 68, 0, 0
    while pos + 4 <= len(body):
        end = pos + 4 + int.from_bytes(body[pos + 2:pos + 4], "big")
        if body[pos] == 0x20:         # presentation context: ID, 3 reserved bytes, then its sub-items
            contexts += 1
            sub = pos + 8
            while sub + 4 <= min(end, len(body)):
                syntaxes += body[sub] == 0x40
                sub += 4 + int.from_bytes(body[sub + 2:sub + 4], "big")
        pos = end
    return contexts, syntaxes


class _Shared(list):
    """The server's supported contexts, handed to each association as they are: pynetdicom deep-copies them for
    every connection (~0.1 s for the node's 171 storage classes x 45 transfer syntaxes, before a byte is read),
    though negotiation only reads them."""

    def __deepcopy__(self, memo):
        return self


class GuardedConnection:
    """A peer's socket as pynetdicom reads it, with the PDU size limits and read deadlines (module docstring);
    everything else is the socket's own."""

    def __init__(self, sock: socket.socket, limits: TransportLimits, peer: str, refuse):
        self._sock, self.limits, self.peer, self._refuse = sock, limits, peer, refuse
        self._head = bytearray()      # the header of the PDU being read, while incomplete
        self._left = 0                # bytes of the current PDU's body not yet read
        self._request = None          # the A-ASSOCIATE-RQ's body while it arrives (at most max_request_pdu bytes)
        self.pdus = 0                 # whole PDUs read
        self.refused = ""             # why this connection was closed by a limit ("" while it was not)
        self.peer_closed = False
        self._deadline = time.monotonic() + limits.association_timeout

    def __getattr__(self, name):      # fileno (for select), send, shutdown, close, ...: the socket's
        return getattr(self._sock, name)

    def _what(self) -> tuple[str, float]:
        if self.pdus == 0:
            return "an association request (A-ASSOCIATE-RQ)", self.limits.association_timeout
        return "a PDU", self.limits.network_timeout

    def recv(self, bufsize: int) -> bytes:
        if self.pdus and self._left == 0 and not self._head:  # a new PDU begins: its own deadline
            self._deadline = time.monotonic() + self.limits.network_timeout
        remaining = self._deadline - time.monotonic()
        what, limit = self._what()
        if remaining <= 0:
            self.close_for(f"{what} not received whole within {limit:g} s")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(bufsize)
        except TimeoutError:
            self.close_for(f"{what} not received whole within {limit:g} s")
        if not data:
            self.peer_closed = True
        self._follow(data)
        return data

    def send(self, data, *args):
        self._sock.settimeout(self.limits.network_timeout)  # a peer that does not read cannot hold a send forever
        return self._sock.send(data, *args)

    def _follow(self, data: bytes) -> None:
        """Track the PDU boundaries through `data`; a header over its limit closes the connection."""
        i = 0
        while i < len(data):
            if self._left == 0:
                take = min(6 - len(self._head), len(data) - i)
                self._head += data[i:i + take]
                i += take
                if len(self._head) < 6:
                    continue
                kind, length = self._head[0], int.from_bytes(self._head[2:6], "big")
                self._head.clear()
                limit = self.limits.max_pdu if kind == P_DATA_TF else self.limits.max_request_pdu
                if length > limit:
                    name = "P-DATA-TF" if kind == P_DATA_TF else f"type 0x{kind:02X}"
                    self.close_for(f"a {name} PDU declaring {length:,} bytes, over the {limit:,}-byte maximum")
                self._left = length
                if kind == A_ASSOCIATE_RQ and self.pdus == 0:
                    self._request = bytearray()
                if length == 0:
                    self.pdus += 1
            else:
                take = min(self._left, len(data) - i)
                if self._request is not None:
                    self._request += data[i:i + take]
                self._left -= take
                i += take
                if self._left == 0:
                    if self._request is not None:
                        self._check_request(bytes(self._request))
                        self._request = None
                    self.pdus += 1

    def _check_request(self, body: bytes) -> None:
        """An A-ASSOCIATE-RQ proposing more presentation contexts or transfer syntaxes than any sender needs is
        refused before pynetdicom negotiates it: negotiation costs CPU in proportion to what is proposed (3,000
        contexts in 180-243 KB cost half a CPU-second each, and a few peers repeating them starve everyone)."""
        contexts, syntaxes = proposed(body)
        if contexts > MAX_CONTEXTS:
            self.close_for(f"an A-ASSOCIATE-RQ proposing {contexts:,} presentation contexts, over the standard's "
                           f"{MAX_CONTEXTS}")
        if syntaxes > MAX_TRANSFER_SYNTAXES:
            self.close_for(f"an A-ASSOCIATE-RQ proposing {syntaxes:,} transfer syntaxes, over {MAX_TRANSFER_SYNTAXES:,}")

    def close_for(self, why: str):
        """Refuse: log once, tell the peer (an A-ABORT once associated), close, and raise `Refused`."""
        if not self.refused:
            self.refused = why
            self._refuse(self.peer, why)
            try:
                self._sock.settimeout(1.0)
                self._sock.sendall(_abort() if self.pdus else _rejection())
            except OSError:
                pass
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise Refused(why)


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, reading through a `GuardedConnection` and holding its connection's slot until
    the association's thread ends."""

    def setup(self):
        host, port = self.client_address[:2]
        self.request = GuardedConnection(self.request, self.server.limits, f"{host}:{port}", self.server.refuse)

    def _create_association(self):
        self.assoc = super()._create_association()
        # pynetdicom's reader polls every millisecond: a few dozen connections that never associate would take a
        # core (and starve the accept loop); until its association is accepted, a connection's reader polls at 50 Hz
        self.assoc.dul._run_loop_delay = NEGOTIATION_POLL
        return self.assoc

    def handle(self):
        try:
            super().handle()
            self.assoc.join()
        finally:
            self.server.release(self.client_address[0])
            conn, assoc = self.request, getattr(self, "assoc", None)
            if conn.pdus == 0 and not conn.refused and not conn.peer_closed:
                conn.refused = f"no association request within {self.server.limits.association_timeout:g} s"
                self.server.refuse(conn.peer, conn.refused)
            elif conn.pdus and not conn.refused and assoc is not None and not getattr(assoc, "was_established", False) \
                    and not assoc.is_rejected:  # pynetdicom aborts a request it cannot read, and says nothing
                conn.refused = "an association request that could not be read (malformed), or a peer that left first"
                self.server.refuse(conn.peer, conn.refused)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection limits per peer address and in all (module docstring)."""

    daemon_threads = True             # a stop does not wait for a peer's association to end
    request_queue_size = 256          # socketserver's 5 would leave a burst of connections unaccepted for seconds

    def __init__(self, ae, address, ae_title, contexts, ssl_context=None, evt_handlers=None, *,
                 limits: TransportLimits, refuse):
        self.limits, self.refuse = limits, refuse
        self.open = Counter()         # peer address -> connections open
        self.known = {}               # peer address -> time.monotonic() of its last accepted association
        self._gate = threading.Lock()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers,
                         request_handler=GuardedHandler)
        self.contexts = _Shared(self.contexts)
        self.bind(evt.EVT_ESTABLISHED, self._established)

    def service_actions(self) -> None:
        """Nothing: pynetdicom's forces gc.collect() every 60 turns of the accept loop, which in a process holding
        torch takes up to seconds, during which no connection is accepted (Python's own collector runs anyway)."""

    def _established(self, event) -> None:
        event.assoc.dul._run_loop_delay = 0.001  # pynetdicom's own, for the data
        event.assoc.was_established = True
        with self._gate:
            self.known[event.assoc.requestor.address] = time.monotonic()

    def _why_not(self, host: str) -> str:
        """Why one more connection from `host` is refused now ('' when it is not); under the gate's lock."""
        lim, total = self.limits, sum(self.open.values())
        if self.open[host] >= lim.max_per_peer:
            return f"{self.open[host]} connections from {host} open, its limit (--max-associations-per-peer " \
                   f"{lim.max_per_peer})"
        known = time.monotonic() - self.known.get(host, -KNOWN_SECONDS) < KNOWN_SECONDS
        if total >= lim.max_connections + (lim.max_per_peer if known else 0):
            return f"{total} connections open, the node's limit (--max-associations {lim.max_connections}" + \
                   (f", and the reserve of {lim.max_per_peer} for known peers)" if known else ")")
        return ""

    def verify_request(self, request, client_address) -> bool:
        host = client_address[0]
        with self._gate:
            why = self._why_not(host)
            if not why:
                self.open[host] += 1
        if why:
            self.refuse(f"{host}:{client_address[1]}", why)
            try:
                request.settimeout(0.5)
                request.sendall(_rejection())
            except OSError:
                pass
        return not why                # socketserver closes a refused connection itself

    def release(self, host: str) -> None:
        with self._gate:
            self.open[host] -= 1
            if self.open[host] <= 0:
                del self.open[host]


def start_server(ae, address, limits: TransportLimits, refuse, evt_handlers=None) -> GuardedServer:
    """Listen as `ae` (its supported contexts and AE title) with the limits, serving in a background thread, as
    pynetdicom's `AE.start_server(block=False)` does. The AE's own limits are made the same: its maximum PDU, its
    ACSE (ARTIM) and network timeouts, and its `maximum_associations` (never reached first: the gate admits no more)."""
    ae.maximum_pdu_size = limits.max_pdu
    ae.acse_timeout = limits.association_timeout
    ae.network_timeout = limits.network_timeout + 1.0
    ae.maximum_associations = limits.max_connections + limits.max_per_peer
    server = ae.make_server(address, evt_handlers=evt_handlers, server_class=GuardedServer, limits=limits,
                            refuse=refuse)
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer@node", daemon=True)
    thread.start()
    ae._servers.append(server)        # as AE.start_server does: AE.shutdown() stops it too
    return server
