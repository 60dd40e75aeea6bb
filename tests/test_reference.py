"""Image references (Docker's grammar and normalisation) and locations (skopeo's spelling)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from laminae._exceptions import InvalidArgument
from laminae.images._reference import Reference, local_name, parse_reference
from laminae.images._transports import ImageLocation, built_in_transports, parse_location

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "expected", "full", "familiar", "api"),
    [
        pytest.param(
            "busybox",
            Reference("docker.io", "library/busybox", None, None),
            "docker.io/library/busybox",
            "busybox",
            "latest",
            id="official-image",
        ),
        pytest.param(
            "busybox:1.36",
            Reference("docker.io", "library/busybox", "1.36", None),
            "docker.io/library/busybox:1.36",
            "busybox:1.36",
            "1.36",
            id="official-tagged",
        ),
        pytest.param(
            "user/app",
            Reference("docker.io", "user/app", None, None),
            "docker.io/user/app",
            "user/app",
            "latest",
            id="hub-user",
        ),
        pytest.param(
            "index.docker.io/library/busybox",
            Reference("docker.io", "library/busybox", None, None),
            "docker.io/library/busybox",
            "busybox",
            "latest",
            id="legacy-hub-name",
        ),
        pytest.param(
            "quay.io/ns/img:v1",
            Reference("quay.io", "ns/img", "v1", None),
            "quay.io/ns/img:v1",
            "quay.io/ns/img:v1",
            "v1",
            id="other-registry",
        ),
        pytest.param(
            "quay.io/img",
            Reference("quay.io", "img", None, None),
            "quay.io/img",
            "quay.io/img",
            "latest",
            id="no-library-prefix-elsewhere",
        ),
        pytest.param(
            "localhost/img",
            Reference("localhost", "img", None, None),
            "localhost/img",
            "localhost/img",
            "latest",
            id="localhost",
        ),
        pytest.param(
            "localhost:5000/ns/name:tag",
            Reference("localhost:5000", "ns/name", "tag", None),
            "localhost:5000/ns/name:tag",
            "localhost:5000/ns/name:tag",
            "tag",
            id="port-is-not-a-tag",
        ),
        pytest.param(
            f"127.0.0.1:5000/x@{DIGEST}",
            Reference("127.0.0.1:5000", "x", None, DIGEST),
            f"127.0.0.1:5000/x@{DIGEST}",
            f"127.0.0.1:5000/x@{DIGEST}",
            DIGEST,
            id="ipv4-digest",
        ),
        pytest.param(
            f"name:tag@{DIGEST}",
            Reference("docker.io", "library/name", "tag", DIGEST),
            f"docker.io/library/name:tag@{DIGEST}",
            f"name:tag@{DIGEST}",
            DIGEST,
            id="tag-and-digest",
        ),
        pytest.param(
            "[::1]:5000/x:y",
            Reference("[::1]:5000", "x", "y", None),
            "[::1]:5000/x:y",
            "[::1]:5000/x:y",
            "y",
            id="ipv6-host",
        ),
        pytest.param(
            "Registry.Example.com/a.b/c__d/e---f:V_1.-x",
            Reference("Registry.Example.com", "a.b/c__d/e---f", "V_1.-x", None),
            "Registry.Example.com/a.b/c__d/e---f:V_1.-x",
            "Registry.Example.com/a.b/c__d/e---f:V_1.-x",
            "V_1.-x",
            id="separators-and-upper-case-host",
        ),
    ],
)
def test_parse_reference(
    text: str, expected: Reference, full: str, familiar: str, api: str
) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert str(ref) == full
    assert ref.familiar == familiar
    assert ref.api_reference == api
    assert ref.name == f"{ref.registry}/{ref.repository}"
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar) == ref


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("UPPER/x", "lower-case", id="upper-case-first-component"),
        pytest.param("docker.io/Ns/x", "lower-case", id="upper-case-path"),
        pytest.param("x:", "tag ''", id="empty-tag"),
        pytest.param("x:-bad", "tag '-bad'", id="tag-starts-with-dash"),
        pytest.param("x:" + "t" * 129, "tag", id="tag-too-long"),
        pytest.param("x@sha256:short", "64 lower-case hex", id="short-digest"),
        pytest.param(f"x@sha256:{HEX.upper()}", "64 lower-case hex", id="upper-case-digest"),
        pytest.param(f"x@md5:{HEX}", "not sha256", id="unknown-algorithm"),
        pytest.param("x@", "not sha256", id="empty-digest"),
        pytest.param(f"x@{DIGEST}@{DIGEST}", "hex", id="two-digests"),
        pytest.param("a//b", "empty component", id="double-slash"),
        pytest.param("a/b/", "empty component", id="trailing-slash"),
        pytest.param("/a", "empty component", id="leading-slash"),
        pytest.param(":tag", "no repository", id="no-name"),
        pytest.param("a_-b", "'a_-b'", id="mixed-separators"),
        pytest.param("a..b", "'a..b'", id="double-dot"),
        pytest.param("-a", "'-a'", id="leading-separator"),
        pytest.param("bad_host.-x.io/a", "registry", id="bad-host"),
        pytest.param("host.io:port/a", "registry", id="non-numeric-port"),
        pytest.param("a b", "'a b'", id="space"),
        pytest.param(HEX, "image id", id="bare-image-id"),
    ],
)
def test_parse_reference_rejects(text: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference") as info:
        parse_reference(text)
    assert repr(text)[:60].rstrip("'") in str(info.value)
    assert complaint in str(info.value)


def test_reference_length_limit_counts_the_normalised_name() -> None:
    # docker.io/library/ + 237 = 255 characters: the longest name accepted.
    assert len(parse_reference("a" * 237).name) == 255
    with pytest.raises(InvalidArgument, match="longer than 255"):
        parse_reference("a" * 238)
    with pytest.raises(InvalidArgument, match="longer than 255"):
        parse_reference("quay.io/" + "/".join(["abc"] * 80))


def test_tag_of_128_characters_is_the_longest() -> None:
    assert parse_reference("x:" + "t" * 128).tag == "t" * 128


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello", "hello:latest"),
        ("hello:1", "hello:1"),
        ("localhost:5000/ns/x", "localhost:5000/ns/x:latest"),
        (f"x@{DIGEST}", f"x@{DIGEST}"),
        ("docker.io/library/x", "docker.io/library/x:latest"),
    ],
)
def test_local_name(text: str, expected: str) -> None:
    assert local_name(text) == expected


def test_local_name_rejects_an_invalid_reference() -> None:
    with pytest.raises(InvalidArgument, match="'Hello'"):
        local_name("Hello")


_COMPONENT = st.from_regex(r"[a-z0-9]{1,5}(?:(?:\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(
    registry=st.sampled_from([None, "quay.io", "localhost", "localhost:5000", "[fe80::1]:443"]),
    components=st.lists(_COMPONENT, min_size=1, max_size=4),
    tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True),
    digest=st.none() | st.just(DIGEST),
)
def test_reference_round_trips(
    registry: str | None, components: list[str], tag: str | None, digest: str | None
) -> None:
    # Without a registry, a first component holding "." would be read as one (as Docker does).
    assume(registry is not None or len(components) == 1 or "." not in components[0])
    text = "/".join(components if registry is None else [registry, *components])
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_reference(text)
    assert ref.tag == (tag or None)
    assert ref.digest == digest
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar) == ref
    if registry is not None:
        assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:/srv/layout", ImageLocation("oci", Path("/srv/layout"), None)),
        ("oci:/srv/layout:v1", ImageLocation("oci", Path("/srv/layout"), "v1")),
        # containers/image splits at the first ":": the rest is the ref name, colons and all.
        (
            "oci:relative/dir:ref:with:colons",
            ImageLocation("oci", Path("relative/dir"), "ref:with:colons"),
        ),
        (
            "oci:/l:example.com/ns/app:1.0",
            ImageLocation("oci", Path("/l"), "example.com/ns/app:1.0"),
        ),
        ("oci-archive:/x.tar:tag", ImageLocation("oci-archive", Path("/x.tar"), "tag")),
        ("oci-archive:x.tar", ImageLocation("oci-archive", Path("x.tar"), None)),
        ("docker-archive:/x.tar", ImageLocation("docker-archive", Path("/x.tar"), None)),
        (
            "docker-archive:/x.tar:name:tag",
            ImageLocation("docker-archive", Path("/x.tar"), "name:tag"),
        ),
        (
            "docker-archive:/x.tar:localhost:5000/ns/name:tag",
            ImageLocation("docker-archive", Path("/x.tar"), "localhost:5000/ns/name:tag"),
        ),
        ("docker-archive:/x.tar:@0", ImageLocation("docker-archive", Path("/x.tar"), "@0")),
        (
            "docker://localhost:5000/a/b:c",
            ImageLocation("docker", None, "localhost:5000/a/b:c"),
        ),
        ("docker://busybox", ImageLocation("docker", None, "busybox")),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_parse_location(text: str, expected: ImageLocation) -> None:
    location = parse_location(text)
    assert location == expected
    assert str(location) == text
    assert parse_location(str(location)) == location


def test_docker_location_reference_parses_as_a_reference() -> None:
    location = parse_location("docker://localhost:5000/a/b:c")
    assert location.reference is not None
    assert parse_reference(location.reference) == Reference("localhost:5000", "a/b", "c", None)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        pytest.param("foo:bar", "unknown transport 'foo'", id="unknown-transport"),
        pytest.param("docker:x", "docker://REFERENCE", id="docker-without-slashes"),
        pytest.param("docker:/x", "docker://REFERENCE", id="docker-one-slash"),
        pytest.param("docker://", "names no image", id="docker-empty"),
        pytest.param("docker://UPPER/x", "lower-case", id="docker-bad-reference"),
        pytest.param("oci:", "empty path", id="oci-empty-path"),
        pytest.param("oci::v1", "empty path", id="oci-empty-path-with-ref"),
        pytest.param("oci:/srv/l:", "empty reference", id="oci-empty-ref"),
        pytest.param("oci:/srv/l:bad/ref/", "not an OCI ref name", id="oci-bad-ref"),
        pytest.param("oci-archive:", "empty path", id="oci-archive-empty-path"),
        pytest.param("docker-archive:", "empty path", id="docker-archive-empty-path"),
        pytest.param("docker-archive:/x.tar:@-1", "'@-1'", id="docker-archive-negative-index"),
        pytest.param(f"docker-archive:/x.tar:n@{DIGEST}", "not a digest", id="archive-digest"),
        pytest.param("docker-archive:/x.tar:Name", "lower-case", id="archive-bad-name"),
        pytest.param("", "names no transport", id="empty"),
    ],
)
def test_parse_location_rejects(text: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match="image location") as info:
        parse_location(text)
    assert complaint in str(info.value)


def test_unknown_transport_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_location("foo:bar")
    message = str(info.value)
    assert "'foo:bar'" in message
    for transport in built_in_transports():
        assert f"{transport}:" in message


@pytest.mark.parametrize("text", ["busybox", "busybox:1.36", "localhost:5000/ns/x"])
def test_plain_reference_is_not_a_location(text: str) -> None:
    with pytest.raises(InvalidArgument, match=f"write 'docker://{text}'"):
        parse_location(text)


def test_plain_garbage_gets_no_docker_hint() -> None:
    with pytest.raises(InvalidArgument, match="names no transport") as info:
        parse_location("Not A Reference")
    assert "docker://" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        pytest.param(("ftp", Path("/x"), None), "unknown transport", id="unknown-transport"),
        pytest.param(("oci", None, "v1"), "needs a path", id="oci-without-path"),
        pytest.param(("docker", Path("/x"), "busybox"), "no path", id="docker-with-path"),
        pytest.param(("docker", None, None), "names no image", id="docker-without-reference"),
        pytest.param(("oci", Path("/a:b"), None), "holds ':'", id="path-with-colon"),
        pytest.param(("oci", Path("/a"), ""), "empty", id="empty-reference"),
    ],
)
def test_image_location_checks_its_fields(
    fields: tuple[str, Path | None, str | None], complaint: str
) -> None:
    with pytest.raises(InvalidArgument, match="invalid image location") as info:
        ImageLocation(*fields)
    assert complaint in str(info.value)


def test_image_location_is_a_frozen_value() -> None:
    location = ImageLocation("oci", Path("/srv/layout"), "v1")
    assert location == ImageLocation("oci", Path("/srv/layout"), "v1")
    assert hash(location) == hash(ImageLocation("oci", Path("/srv/layout"), "v1"))
    with pytest.raises(AttributeError):
        location.reference = "v2"  # type: ignore[misc]
