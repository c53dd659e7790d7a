"""Scrape a gateway's /metrics and read it with prometheus-client's own text-format parser."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# What prometheus_client.generate_latest answers (text exposition format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Series = tuple[str, frozenset[tuple[str, str]]]


@dataclass(frozen=True)
class Scrape:
    text: str
    families: dict[str, str]  # family name -> type
    samples: dict[Series, float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        families: dict[str, str] = {}
        samples: dict[Series, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                # prometheus-client's creation timestamps of counters and histograms, which the
                # 0.0.4 text format carries as gauges of their own: bookkeeping, not a metric.
                continue
            families[family.name] = family.type
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return cls(text, families, samples)

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name and label in dict(labels)}

    def series(self) -> set[Series]:
        return set(self.samples)


async def scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == CONTENT_TYPE
        return Scrape.parse(await response.text())
