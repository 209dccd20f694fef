"""The Lab Streaming Layer side of live decoding: the stream formats and a machine-only liblsl.

Spike stream (type `Spikes`, irregular rate, one int32 channel): one sample per spike, its value
the unit's index in the session's unit list and its LSL timestamp the spike's time. The list is in
the stream's description (`<desc><units><unit><index/><id/></unit>...`): a rig maps its channels to
the unit ids the model was finetuned on there (runbooks/live.md).

Count stream (type `SpikeCounts`, a regular rate of 1 / bin, one int32 channel per unit), for rigs
that bin: each sample holds every unit's spike count in the bin that ends at its timestamp; channel
k is unit k of the same `<units>` list, the bin width is `<bin_s>` in the description (else 1 / the
nominal rate). Its spikes are placed evenly inside their bin (`counts_to_spikes`), and a prediction
uses whole bins only: those ended by its tick.

Behaviour stream (type `Behaviour`, float32, one channel per dimension): the session's recorded
behaviour, so a replayed session can be scored live.

liblsl binds its data ports to every interface whatever ListenAddress says; unless the user points
LSLAPICFG at their own file, popscale writes one that keeps discovery on this machine (ResolveScope
machine, KnownPeers 127.0.0.1, no IPv6) before liblsl is first loaded. runbooks/security.md says what
still listens and how to firewall it.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPIKES, COUNTS, BEHAVIOUR = "Spikes", "SpikeCounts", "Behaviour"

MACHINE_ONLY = """\
; popscale: LSL discovery on this machine only (runbooks/security.md)
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
KnownPeers = {127.0.0.1}
"""


def machine_only_config(directory: Path | None = None) -> Path:
    """Writes the machine-only lsl_api.cfg (in `directory`, default a temp dir) and returns it."""
    d = Path(directory) if directory else Path(tempfile.gettempdir()) / "popscale-lsl"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "lsl_api.cfg"
    if not path.exists() or path.read_text() != MACHINE_ONLY:
        path.write_text(MACHINE_ONLY)
    return path


def lsl():
    """pylsl, loaded with the machine-only config unless LSLAPICFG names another. liblsl reads its
    config once, at its first call: set LSLAPICFG before anything touches pylsl."""
    os.environ.setdefault("LSLAPICFG", str(machine_only_config()))
    try:
        import pylsl  # deferred: liblsl reads LSLAPICFG once, when loaded: set just above
    except ImportError as e:  # an extra: its wheel needs glibc >= 2.35
        raise RuntimeError("live decoding needs pylsl: pip install 'popscale[live]' (a manylinux_2_35 wheel "
                           "that bundles liblsl)") from e
    return pylsl


@dataclass(frozen=True)
class SpikeStreamInfo:
    """What a spike stream says about itself: its name, source and the units its values index; for
    a count stream, its bin width."""
    name: str
    source_id: str
    unit_ids: list[str]
    session: str
    bin_s: float | None = None  # None: one sample per spike; else a count stream's bin width

    @property
    def binned(self) -> bool:
        return self.bin_s is not None


def spike_stream_info(name: str, source_id: str, session: str, unit_ids: list[str]):
    """An LSL StreamInfo for spikes, the unit list in its description."""
    pylsl = lsl()
    info = pylsl.StreamInfo(name, SPIKES, 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32, source_id)
    _describe(info, session, unit_ids)
    return info


def counts_stream_info(name: str, source_id: str, session: str, unit_ids: list[str], bin_s: float,
                       rate: float | None = None):
    """An LSL StreamInfo for binned spike counts: one channel per unit, one sample per bin of `bin_s`
    recording seconds; `rate`: samples per LSL second when that is not 1 / bin_s (a faster replay)."""
    pylsl = lsl()
    info = pylsl.StreamInfo(name, COUNTS, len(unit_ids), rate or 1.0 / bin_s, pylsl.cf_int32, source_id)
    _describe(info, session, unit_ids)
    info.desc().append_child_value("bin_s", repr(float(bin_s)))
    return info


def _describe(info, session: str, unit_ids: list[str]) -> None:
    desc = info.desc()
    desc.append_child_value("session", session)
    units = desc.append_child("units")
    for i, u in enumerate(unit_ids):
        unit = units.append_child("unit")
        unit.append_child_value("index", str(i))
        unit.append_child_value("id", str(u))


def behaviour_stream_info(name: str, source_id: str, session: str, behaviour: str, dims: int, rate: float):
    """An LSL StreamInfo for one behaviour of a session (float32, `dims` channels)."""
    pylsl = lsl()
    info = pylsl.StreamInfo(name, BEHAVIOUR, dims, rate, pylsl.cf_float32, source_id)
    info.desc().append_child_value("session", session)
    info.desc().append_child_value("behaviour", behaviour)
    return info


def read_spike_stream_info(info) -> SpikeStreamInfo:
    """The unit list and session of a resolved spike stream (from its full XML description)."""
    root = ET.fromstring(info.as_xml())
    desc = root.find("desc")
    units = [] if desc is None or desc.find("units") is None else desc.find("units").findall("unit")
    ids = [""] * len(units)
    for u in units:
        ids[int(u.findtext("index"))] = u.findtext("id") or ""
    session = (desc.findtext("session") if desc is not None else None) or ""
    bin_s = None
    if info.type() == COUNTS:
        text = desc.findtext("bin_s") if desc is not None else None
        bin_s = float(text) if text else 1.0 / info.nominal_srate() if info.nominal_srate() > 0 else None
        if not bin_s or bin_s <= 0:
            raise ValueError(f"LSL count stream {info.name()!r}: no bin width (<bin_s> in its description, or a "
                             "nominal rate)")
        if not ids:
            ids = [str(k) for k in range(info.channel_count())]
    elif info.channel_count() != 1:
        raise ValueError(f"LSL stream {info.name()!r} (type {info.type()!r}): a spike stream has one channel (the unit "
                         f"index), it has {info.channel_count()}; a binned rig sends type {COUNTS!r}")
    return SpikeStreamInfo(info.name(), info.source_id(), ids, session, bin_s)


def counts_to_spikes(stamps: np.ndarray, counts: np.ndarray, bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, channels) of the spikes in count samples (n, channels) stamped at their bins' ends: a
    unit's c spikes of a bin at its c evenly spaced midpoints, (k + 0.5) / c of the way through it."""
    stamps = np.asarray(stamps, np.float64).ravel()
    counts = np.asarray(counts, np.int64).reshape(len(stamps), -1)
    c = np.clip(counts, 0, None).ravel()
    if not c.sum():
        return np.zeros(0), np.zeros(0, np.int64)
    row, chan = np.divmod(np.arange(c.size), counts.shape[1])
    n = np.repeat(c, c)
    k = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
    times = np.repeat(stamps[row], c) - bin_s + (k + 0.5) / n * bin_s
    order = np.argsort(times, kind="stable")
    return times[order], np.repeat(chan, c)[order]
