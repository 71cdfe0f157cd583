"""docker-compose.yml read as data: the default stack is the single broker alone, and the
cluster profile is what its comment and docs/cluster.md say (three JetStream nodes in one
NATS cluster, two brokers on all three with replicas 3, one shared key pair, a published
port pair per broker). tests/test_container_engine.py runs both for real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
NODES = ["nats1", "nats2", "nats3"]
BROKERS = ["broker1", "broker2"]


def test_without_a_profile_the_compose_file_runs_the_single_broker_alone():
    default = [name for name, service in SERVICES.items() if not service.get("profiles")]
    assert default == ["broker"]
    single = SERVICES["broker"]
    assert "MANGOGRAM_NATS" not in single.get("environment", {})  # SQLite, as before
    assert single["volumes"] == ["mangogram-data:/data"]


def test_the_cluster_profile_is_three_nats_nodes_and_two_brokers():
    cluster = sorted(name for name, s in SERVICES.items() if "cluster" in s.get("profiles", []))
    assert cluster == sorted(BROKERS + NODES)


def flags(service: dict[str, Any]) -> dict[str, str]:
    return dict(word.removeprefix("--").partition("=")[::2] for word in service["command"])


def test_each_nats_node_runs_jetstream_clustered_with_the_others_on_a_volume_of_its_own():
    images = {SERVICES[node]["image"] for node in NODES}
    assert len(images) == 1
    default = re.fullmatch(r"\$\{MANGOGRAM_NATS_IMAGE:-nats:(\d+)\.(\d+)\}", images.pop())
    assert default, "the default NATS image is nats:<major>.<minor>"
    # The brokers fence mailbox writes with Nats-Expected-Last-Subject-Sequence-Subject,
    # which servers before 2.11 ignore.
    assert (int(default.group(1)), int(default.group(2))) >= (2, 11)
    volumes = []
    for node in NODES:
        found = flags(SERVICES[node])
        assert "jetstream" in found and found["store_dir"] == "/data"
        assert found["server_name"] == node
        assert found["cluster_name"] == "mangogram"
        assert found["cluster"].endswith(":6222")
        assert set(found["routes"].split(",")) == {f"nats://{n}:6222" for n in NODES}
        assert "ports" not in SERVICES[node]  # NATS is for the brokers only: not published
        volumes += SERVICES[node]["volumes"]
        assert SERVICES[node]["restart"] == "unless-stopped"
    assert volumes == [f"{node}-data:/data" for node in NODES]
    assert all(f"{node}-data" in COMPOSE["volumes"] for node in NODES)


def test_the_brokers_use_all_three_nodes_with_replicas_3_and_share_one_key_pair():
    published = []
    for number, name in enumerate(BROKERS, start=1):
        broker = SERVICES[name]
        env = broker["environment"]
        assert env["MANGOGRAM_NATS"] == ",".join(f"nats://{n}:4222" for n in NODES)
        assert env["MANGOGRAM_NATS_REPLICAS"] == "3"
        assert env["MANGOGRAM_KEY_FILE"] == "/cluster-key/broker_key.json"
        assert "cluster-key:/cluster-key" in broker["volumes"]
        assert f"{name}-data:/data" in broker["volumes"]  # its own data directory
        assert broker["image"] == SERVICES["broker"]["image"]  # the same image
        assert broker["build"] == SERVICES["broker"]["build"]
        assert sorted(broker["depends_on"]) == NODES
        assert broker["restart"] == "unless-stopped"  # started before JetStream: again
        chat, key = broker["ports"]
        assert chat == f"${{MANGOGRAM_BROKER{number}_PORT:-{5555 + 10 * number}}}:5555"
        assert key == f"${{MANGOGRAM_BROKER{number}_KEY_PORT:-{5556 + 10 * number}}}:5556"
        published += [chat.split(":-")[1].split("}")[0], key.split(":-")[1].split("}")[0]]
    assert published == ["5565", "5566", "5575", "5576"]
    assert "cluster-key" in COMPOSE["volumes"]


def test_the_image_lets_the_broker_write_the_shared_key_volume():
    # A named volume first mounted on /cluster-key takes the image directory's owner.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"mkdir -p /data /cluster-key \\\n\s+&& chown mangogram:mangogram "
                     r"/data /cluster-key", dockerfile)  # fmt: skip
    assert 'pip install --no-cache-dir "./[cluster]"' in dockerfile  # nats-py in the image
