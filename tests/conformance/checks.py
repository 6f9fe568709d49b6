"""The checks of each test description, as data, and the verdicts a run gives them.

Every TD in scope lists the server-side "check" lines of its sequence (the ETSI CoAP#4 test
descriptions, https://github.com/cabo/td-coap4: base.yml, block.yml (with its TD_COAP_OBS part),
link.yml) as short labels; a test marks each label passed or failed on what came over the wire.
A label the test never reached (an earlier step got no answer) counts as failed, so the number
of checks does not depend on how far a run got. The conformance conftest prints the tally at the
end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_CORE_205 = ("2.05 Content", "MID = CMID", "token = CTOK", "Content-Format", "payload non-empty")
_NON_TYPE = "NON response (no ACK)"
_OBS_FIRST = (
    "first answer: ACK 2.05 (piggybacked)",
    "first answer: Content-Format f",
    "first answer: token t",
    "first answer: Observe",
)
_OBS_NOTE = (
    "notification: CON",
    "notification: 2.05 Content",
    "notification: Content-Format f",
    "notification: token t",
    "notification: Observe increasing",
)

# TD → (what the test drives, the checks). The labels paraphrase the TD's check lines.
TDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "TD_COAP_CORE_01": (
        "CON GET /test (raw, libcoap)",
        ("piggybacked in ACK", *_CORE_205, "coap-client displays the payload"),
    ),
    "TD_COAP_CORE_02": (
        "CON DELETE /test (raw, libcoap)",
        (
            "2.02 Deleted",
            "piggybacked in ACK",
            "MID = CMID",
            "token = CTOK",
            "Content-Format if payload",
            "coap-client gets 2.02",
        ),
    ),
    "TD_COAP_CORE_03": (
        "CON PUT /test with Content-Format (raw, libcoap)",
        (
            "2.04 or 2.01",
            "MID = CMID",
            "token = CTOK",
            "Content-Format if payload",
            "origin got the body and its media type",
            "coap-client gets 2.04/2.01",
        ),
    ),
    "TD_COAP_CORE_04": (
        "CON POST /test with Content-Format (raw, libcoap)",
        (
            "2.01 or 2.04",
            "MID = CMID",
            "token = CTOK",
            "Content-Format if payload",
            "Location-Path values carry no '/'",
            "coap-client gets 2.01/2.04",
        ),
    ),
    "TD_COAP_CORE_05": (
        "NON GET /test (raw, libcoap -N)",
        (_NON_TYPE, "2.05 Content", "token = CTOK", "Content-Format", "coap-client -N displays"),
    ),
    "TD_COAP_CORE_06": (
        "NON DELETE /test (raw)",
        (_NON_TYPE, "2.02 Deleted", "token = CTOK", "Content-Format if payload"),
    ),
    "TD_COAP_CORE_07": (
        "NON PUT /test (raw)",
        (_NON_TYPE, "2.04 or 2.01", "token = CTOK", "Content-Format if payload"),
    ),
    "TD_COAP_CORE_08": (
        "NON POST /test (raw)",
        (
            _NON_TYPE,
            "2.01 or 2.04",
            "token = CTOK",
            "Content-Format if payload",
            "Location-Path values carry no '/'",
        ),
    ),
    "TD_COAP_CORE_09": (
        "CON GET /separate, origin slower than the ACK window (raw, libcoap)",
        (
            "empty ACK: type ACK, code 0.00",
            "empty ACK: MID = CMID, no payload",
            "separate response is CON",
            "separate 2.05 Content",
            "separate token = CTOK",
            "separate Content-Format",
            "separate payload non-empty",
            "coap-client displays the separate response",
        ),
    ),
    "TD_COAP_CORE_10": (
        "CON GET /test, 8-byte token (raw)",
        ("piggybacked in ACK", *_CORE_205),
    ),
    "TD_COAP_CORE_11": (
        "CON GET /separate, 5-byte token (raw)",
        (
            "empty ACK: type ACK, code 0.00",
            "empty ACK: MID = CMID, no payload",
            "separate response is CON",
            "separate 2.05 Content",
            "separate token = CTOK",
            "separate payload non-empty",
        ),
    ),
    "TD_COAP_CORE_12": (
        "CON GET /test, zero-length token (raw, aiocoap)",
        (
            "2.05 Content",
            "MID = CMID",
            "token empty",
            "Content-Format",
            "payload non-empty",
            "aiocoap-client displays the payload",
        ),
    ),
    "TD_COAP_CORE_13": (
        "CON GET /seg1/seg2/seg3 (raw, libcoap)",
        (*_CORE_205, "origin got /seg1/seg2/seg3", "coap-client displays the payload"),
    ),
    "TD_COAP_CORE_14": (
        "CON GET /query?first=1&second=2&third=3 (raw, libcoap)",
        (*_CORE_205, "origin got the three queries", "coap-client displays the payload"),
    ),
    "TD_COAP_CORE_15": (
        "CON GET /test with a lost request and a lost response (raw; libcoap -l 1)",
        (
            "retransmitted request answered 2.05 piggybacked",
            "answer to the retransmission = the lost answer (same bytes)",
            "origin called once for both copies",
            "coap-client recovers from its lost request",
        ),
    ),
    "TD_COAP_CORE_16": (
        "CON GET /separate with lost ACKs in both directions (raw)",
        (
            "empty ACK: MID = CMID",
            "retransmitted request while pending: empty ACK again",
            "separate response CON 2.05 with Content-Format and payload",
            "separate response retransmitted (same MID, token) while not acknowledged",
            "origin called once",
        ),
    ),
    "TD_COAP_CORE_17": (
        "NON GET /separate (raw)",
        (
            "no empty ACK",
            "NON response",
            "2.05 Content",
            "token = CTOK",
            "Content-Format",
            "payload non-empty",
        ),
    ),
    "TD_COAP_CORE_18": (
        "CON POST /test, origin Location /location1/location2/location3 (raw)",
        (
            "2.01 Created",
            "MID = CMID",
            "token = CTOK",
            "Location-Path = location1, location2, location3",
        ),
    ),
    "TD_COAP_CORE_19": (
        "CON POST /location-query, origin Location ?first=1&second=2 (raw, libcoap)",
        (
            "2.01 Created",
            "MID = CMID",
            "token = CTOK",
            "Location-Query = first=1, second=2",
            "coap-client gets 2.01",
        ),
    ),
    "TD_COAP_CORE_20": (
        "CON GET /multi-format with Accept 0 then 41 (raw, libcoap -A)",
        (
            "Accept 0: 2.05, MID, token",
            "Accept 0: Content-Format 0",
            "Accept 0: text payload",
            "Accept 41: 2.05, MID, token",
            "Accept 41: Content-Format 41",
            "Accept 41: XML payload",
            "coap-client -A 41 displays the XML",
        ),
    ),
    "TD_COAP_CORE_21": (
        "GET /validate, GET with ETag, PUT, GET with the old ETag (raw)",
        (
            "first GET: 2.05, MID, token",
            "first GET: ETag (ETAG1)",
            "first GET: payload non-empty",
            "GET with ETAG1: 2.03 Valid, MID, token",
            "GET with ETAG1: ETag = ETAG1",
            "GET with ETAG1: empty payload",
            "after update, GET with ETAG1: 2.05",
            "after update: ETag != ETAG1",
            "after update: the new payload",
        ),
    ),
    "TD_COAP_CORE_22": (
        "GET /validate, PUT If-Match, GET, PUT, PUT If-Match stale (raw)",
        (
            "GET: 2.05 with ETag (ETAG1) and payload",
            "PUT If-Match ETAG1: 2.04, MID, token",
            "GET: 2.05, ETag ETAG2 != ETAG1",
            "GET: payload = the PUT's",
            "PUT without If-Match: 2.04",
            "PUT If-Match ETAG2 (stale): 4.12, MID, token",
            "resource not changed by the refused PUT",
        ),
    ),
    "TD_COAP_CORE_23": (
        "PUT /create1 with If-None-Match twice (raw)",
        (
            "first PUT: 2.01 Created, MID, token",
            "origin created the resource",
            "second PUT: 4.12, MID, token",
            "resource not overwritten",
        ),
    ),
    "TD_COAP_CORE_31": (
        "CoAP ping: Empty CON (raw)",
        ("four-byte answer", "type RST, code 0.00", "MID = CMID", "zero-length token, no payload"),
    ),
    "TD_COAP_BLOCK_01": (
        "GET /large with Block2 NUM 0 SZX 4 (256 B) early (raw, libcoap -b 256)",
        (
            "block 0: 2.05 with Block2 NUM 0, M 1",
            "block 0: SZX <= desired, payload = 2**(SZX+4)",
            "middle blocks: NUM i, M 1, SZX kept, full size",
            "last block: NUM n, M 0, payload <= block size",
            "blocks reassemble the resource (no gap, right order)",
            "no datagram over the block size",
            "coap-client -b 256 displays the whole resource",
        ),
    ),
    "TD_COAP_BLOCK_02": (
        "GET /large without Block2, then late negotiation to SZX 4 (raw, libcoap)",
        (
            "first answer: 2.05 with Block2 NUM 0, M 1",
            "first answer: payload = 2**(SZX+4) (DES_SZX)",
            "switch to smaller SZX: NUM k = 2**(DES-ACT) answered, M 1, full",
            "middle blocks: NUM i, M 1, SZX kept, full size",
            "last block: NUM n, M 0, payload <= block size",
            "blocks reassemble the resource",
            "coap-client (no -b) displays the whole resource",
        ),
    ),
    "TD_COAP_BLOCK_03": (
        "PUT /large-update in Block1 blocks of 256 B (raw, libcoap -b, aiocoap)",
        (
            "block 0: 2.31 (M 1) or 2.04 (M 0) with Block1 NUM 0, SZX <= desired",
            "middle blocks: 2.31/2.04 with Block1 NUM i, SZX kept",
            "last block: 2.04 with Block1 NUM n, M 0",
            "origin got the whole body once",
            "coap-client -b 256 PUT succeeds, origin got its body",
            "aiocoap-client PUT (automatic Block1) succeeds, origin got its body",
        ),
    ),
    "TD_COAP_BLOCK_04": (
        "POST /large-create in Block1 blocks of 256 B (raw)",
        (
            "block 0: 2.31 with Block1 NUM 0, M 1, SZX <= desired",
            "middle blocks: 2.31 with Block1 NUM i, M 1, SZX kept",
            "last block: 2.01 with Block1 NUM n, M 0",
            "Location-Path = large-create, one segment; no '/'",
            "origin got the whole body once",
            "GET on the new location returns the body",
        ),
    ),
    "TD_COAP_BLOCK_05": (
        "POST /large-post: Block1 request, Block2 answer (raw, aiocoap)",
        (
            "request blocks: 2.31 with Block1 NUM i, M 1",
            "last request block: 2.04 with Block1 NUM n, M 0",
            "last request block: Block2 NUM 0, M 1, full payload",
            "response blocks: 2.04 with Block2 NUM i, SZX kept",
            "last response block: M 0, payload <= block size",
            "response blocks reassemble the answer",
            "origin got the whole request body once",
            "aiocoap-client POST gets the whole answer",
        ),
    ),
    "TD_COAP_BLOCK_06": (
        "GET /large with Block2 NUM 0 SZX 0 (16 B) early (raw, libcoap -b 16)",
        (
            "block 0: 2.05 with Block2 NUM 0, M 1",
            "block 0: SZX 0, payload = 16 bytes",
            "middle blocks: NUM i, M 1, SZX 0, 16 bytes",
            "last block: NUM n, M 0, payload <= 16 bytes",
            "blocks reassemble the resource (no gap, right order)",
            "coap-client -b 16 displays the whole resource",
        ),
    ),
    "TD_COAP_OBS_01": (
        "CON GET /obs with Observe=0, two changes (raw, libcoap -s)",
        (
            *_OBS_FIRST,
            *_OBS_NOTE,
            "coap-client -s displays the notifications",
        ),
    ),
    "TD_COAP_OBS_02": (
        "NON GET /obs-non with Observe=0, two changes (raw, aiocoap observe)",
        (
            "first answer: NON 2.05, token, Observe",
            "notification: NON",
            "notification: 2.05 Content",
            "notification: Content-Format unchanged",
            "notification: token = t",
            "notification: Observe increasing",
            "aiocoap observation displays the changes",
        ),
    ),
    "TD_COAP_OBS_04": (
        "server loses the relation, client re-registers with the same token (raw)",
        (
            *_OBS_FIRST,
            *_OBS_NOTE,
            "no notification once the relation is lost",
            "re-registration: ACK 2.05, Content-Format, token t, Observe",
            "after re-registration: CON 2.05 notification, token t, Observe increasing",
        ),
    ),
    "TD_COAP_OBS_05": (
        "client switched off: CON notifications never ACKed (raw)",
        (
            *_OBS_FIRST,
            "notification: CON 2.05, token t",
            "unacknowledged notification retransmitted",
            "retransmission carries the newer state with an updated Observe value",
            "no notification after the final timeout",
        ),
    ),
    "TD_COAP_OBS_06": (
        "client answers a notification with RST (raw)",
        (*_OBS_FIRST, "notification: CON 2.05, token t", "no notification after the RST"),
    ),
    "TD_COAP_OBS_07": (
        "the origin deletes /obs (raw)",
        (
            *_OBS_FIRST,
            "notification: CON 4.04, token t",
            "4.04 notification: no Observe",
            "no notification after the 4.04",
        ),
    ),
    "TD_COAP_OBS_08": (
        "/obs changes Content-Format (raw)",
        (
            *_OBS_FIRST,
            "notification: CON 4.06, token t",
            "4.06 notification: no Observe",
            "no notification after the 4.06",
        ),
    ),
    "TD_COAP_OBS_10": (
        "a GET without Observe (token t2) does not cancel (raw)",
        (
            *_OBS_FIRST,
            "plain GET: ACK 2.05, Content-Format f, token t2",
            "plain GET: no Observe",
            "notifications still arrive: CON 2.05, token t, Observe increasing",
        ),
    ),
    "TD_COAP_OBS_11": (
        "lossy: a notification's ACK is lost while /obs keeps changing (raw)",
        (
            *_OBS_FIRST,
            "notification: CON 2.05, token t",
            "never more than one CON notification in flight",
            "after the ACK: the latest state, nothing more in flight",
        ),
    ),
    "TD_COAP_OBS_12": (
        "GET with Observe=1 and token t cancels (raw, libcoap)",
        (
            *_OBS_FIRST,
            "cancel: ACK 2.05, Content-Format f, token t",
            "cancel: no Observe",
            "no notification after the cancel",
        ),
    ),
    "TD_COAP_OBS_13": (
        "CON GET /obs-large with Observe=0 (raw, aiocoap observe)",
        (
            "first answer: ACK 2.05, token t, Observe",
            "first answer: Block2 NUM 0, M 1, full block",
            "client gets the rest with Block2",
            "notification: CON 2.05, token t, Observe increasing",
            "notification: Block2 NUM 0, M 1, full block",
            "notification: the rest assembles the new representation",
            "aiocoap observation displays the large representation",
        ),
    ),
    "TD_COAP_LINK_01": (
        "GET /.well-known/core (raw, libcoap)",
        (
            "2.05 Content",
            "Content-Format 40",
            "every route listed",
            "coap-client displays the links",
        ),
    ),
    "TD_COAP_LINK_02": (
        "GET /.well-known/core?rt=Type1 (raw)",
        ("2.05, Content-Format 40", "only the links of type Type1"),
    ),
    "TD_COAP_LINK_03": (
        "GET /.well-known/core?rt=* (raw)",
        ("2.05, Content-Format 40", "every link with rt, none without"),
    ),
    "TD_COAP_LINK_04": (
        "GET /.well-known/core?rt=Type2 with multi-valued rt (raw)",
        ("2.05, Content-Format 40", "only groups 'Type1 Type2' and 'Type2 Type3'"),
    ),
    "TD_COAP_LINK_05": (
        "GET /.well-known/core?if=If* (raw)",
        ("2.05, Content-Format 40", "only if=If1 and if=If2"),
    ),
    "TD_COAP_LINK_06": (
        "GET /.well-known/core?sz=* (raw)",
        ("2.05, Content-Format 40", "only the links with sz"),
    ),
    "TD_COAP_LINK_07": (
        "GET /.well-known/core?href=/link1 (raw)",
        ("2.05, Content-Format 40", "only /link1"),
    ),
    "TD_COAP_LINK_08": (
        "GET /.well-known/core?href=/link* (raw)",
        ("2.05, Content-Format 40", "only /link1, /link2, /link3"),
    ),
    "TD_COAP_LINK_09": (
        "/.well-known/core lists /path;ct=40, GET /path, GET /path/sub1 (raw)",
        (
            "discovery lists /path with ct=40",
            "GET /path: 2.05, Content-Format 40",
            "GET /path: lists /path/sub1 and /path/sub2",
            "GET /path/sub1: 2.05 naming /path/sub1",
        ),
    ),
}


@dataclass
class Verdict:
    td: str
    variant: str
    label: str
    passed: bool
    detail: str = ""


# Every verdict of this run, in order (the conftest prints the tally).
RESULTS: list[Verdict] = []


@dataclass
class Checks:
    """The checks of one TD in one test. ``check`` records and goes on (a TD's later steps are
    still worth seeing); ``done`` fails the test if any check failed or was never reached."""

    td: str
    variant: str = ""
    marked: dict[str, Verdict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = TDS[self.td][1]

    def check(self, label: str, passed: bool, detail: object = "") -> bool:
        if label not in self.labels:
            raise KeyError(f"{self.td} has no check {label!r}")
        previous = self.marked.get(label)
        if previous is not None and not previous.passed:
            return False  # a check repeated over blocks stays failed once it failed
        self.marked[label] = Verdict(self.td, self.variant, label, bool(passed), str(detail))
        return bool(passed)

    def done(self) -> None:
        for label in self.labels:
            if label not in self.marked:
                self.marked[label] = Verdict(self.td, self.variant, label, False, "not reached")
        RESULTS.extend(self.marked[label] for label in self.labels)
        failed = [v for v in (self.marked[label] for label in self.labels) if not v.passed]
        if failed:
            lines = "\n".join(f"  {v.label}: {v.detail}" for v in failed)
            raise AssertionError(f"{self.td}{self.variant}: {len(failed)} check(s) failed\n{lines}")
