"""The token rules, kept by registry/store.py, against the real database.

Each call commits (as the API's do), so ``now()`` moves between calls; tests use their
own user ids and tokens so they never see each other's rows.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from registry import store
from registry.store import Change, Registration


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _reg(token: str, device: str, app: str = "com.example.app", **extra: str) -> Registration:
    return Registration(token=token, platform="android", device_id=device, app_id=app, **extra)


async def _row(db: asyncpg.Pool, token: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM device_tokens WHERE token = $1", token)
    assert row is not None
    return row


async def test_a_new_token_is_created_and_listed(db: asyncpg.Pool) -> None:
    user, token = _id("u"), _id("tok")
    result = await store.register(db, user, _reg(token, _id("dev"), locale="de_DE"))

    assert result.change is Change.CREATED
    assert result.replaced == 0
    (device,) = await store.devices(db, user)
    assert (device.token, device.locale) == (token, "de_DE")


async def test_the_same_call_twice_changes_nothing_but_last_seen(db: asyncpg.Pool) -> None:
    user, token, dev = _id("u"), _id("tok"), _id("dev")
    await store.register(db, user, _reg(token, dev))
    before = await _row(db, token)
    await asyncio.sleep(0.01)

    again = await store.register(db, user, _reg(token, dev))

    after = await _row(db, token)
    assert again.change is Change.REFRESHED
    assert after["last_seen_at"] > before["last_seen_at"]
    assert {k: v for k, v in after.items() if k != "last_seen_at"} == {
        k: v for k, v in before.items() if k != "last_seen_at"
    }


async def test_new_details_of_the_same_token_move_updated_at(db: asyncpg.Pool) -> None:
    user, token, dev = _id("u"), _id("tok"), _id("dev")
    await store.register(db, user, _reg(token, dev, app_version="1.0"))
    before = await _row(db, token)

    await store.register(db, user, _reg(token, dev, app_version="1.1"))

    after = await _row(db, token)
    assert after["app_version"] == "1.1"
    assert after["updated_at"] > before["updated_at"]


async def test_rule_1_registering_for_another_user_moves_the_token(db: asyncpg.Pool) -> None:
    alice, bob, token, dev = _id("alice"), _id("bob"), _id("tok"), _id("dev")
    await store.register(db, alice, _reg(token, dev))

    moved = await store.register(db, bob, _reg(token, dev))

    assert moved.change is Change.MOVED
    assert await store.devices(db, alice) == []
    assert [d.token for d in await store.devices(db, bob)] == [token]
    count = await db.fetchval("SELECT count(*) FROM device_tokens WHERE token = $1", token)
    assert count == 1


async def test_rule_2_a_user_keeps_one_token_per_device(db: asyncpg.Pool) -> None:
    user = _id("u")
    tokens = [_id("tok") for _ in range(3)]
    for i, token in enumerate(tokens):
        await store.register(db, user, _reg(token, f"device-{i}-{user}"))

    assert sorted(d.token for d in await store.devices(db, user)) == sorted(tokens)


async def test_rule_3_a_refreshed_token_replaces_the_old_one_of_the_device(
    db: asyncpg.Pool,
) -> None:
    user, dev, old, new = _id("u"), _id("dev"), _id("old"), _id("new")
    await store.register(db, user, _reg(old, dev))

    result = await store.register(db, user, _reg(new, dev))

    assert (result.change, result.replaced) == (Change.CREATED, 1)
    assert [d.token for d in await store.devices(db, user)] == [new]
    old_row = await _row(db, old)
    assert (old_row["is_active"], old_row["deactivation_reason"]) == (False, "replaced")


async def test_the_same_device_id_in_another_app_is_another_device(db: asyncpg.Pool) -> None:
    user, dev = _id("u"), _id("dev")
    await store.register(db, user, _reg(_id("a"), dev, app="com.example.one"))
    await store.register(db, user, _reg(_id("b"), dev, app="com.example.two"))

    assert len(await store.devices(db, user)) == 2


async def test_a_token_moving_to_a_device_replaces_that_devices_token(db: asyncpg.Pool) -> None:
    user, dev1, dev2, tok_a, tok_b = _id("u"), _id("d1"), _id("d2"), _id("a"), _id("b")
    await store.register(db, user, _reg(tok_a, dev1))
    await store.register(db, user, _reg(tok_b, dev2))

    await store.register(db, user, _reg(tok_a, dev2))  # tok_a now claims dev2

    assert [d.token for d in await store.devices(db, user)] == [tok_a]


async def test_rule_4_logout_deactivates_at_once_and_registration_reactivates(
    db: asyncpg.Pool,
) -> None:
    user, token, dev = _id("u"), _id("tok"), _id("dev")
    await store.register(db, user, _reg(token, dev))

    assert await store.logout_device(db, user, dev) == 1
    assert await store.devices(db, user) == []
    row = await _row(db, token)
    assert (row["is_active"], row["deactivation_reason"]) == (False, "logout")

    again = await store.register(db, user, _reg(token, dev))
    assert again.change is Change.REACTIVATED
    row = await _row(db, token)
    assert (row["is_active"], row["deactivation_reason"], row["deactivated_at"]) == (
        True,
        None,
        None,
    )


async def test_logout_by_token(db: asyncpg.Pool) -> None:
    user, token = _id("u"), _id("tok")
    await store.register(db, user, _reg(token, _id("dev")))

    assert await store.logout_token(db, user, token) == 1
    assert await store.logout_token(db, user, token) == 0  # already out
    assert await store.devices(db, user) == []


async def test_another_users_device_cannot_be_logged_out(db: asyncpg.Pool) -> None:
    alice, mallory, token, dev = _id("alice"), _id("mallory"), _id("tok"), _id("dev")
    await store.register(db, alice, _reg(token, dev))

    assert await store.logout_device(db, mallory, dev) == 0
    assert await store.logout_token(db, mallory, token) == 0
    assert [d.token for d in await store.devices(db, alice)] == [token]


async def test_concurrent_new_tokens_for_one_device_leave_exactly_one_active(
    db: asyncpg.Pool,
) -> None:
    user, dev = _id("u"), _id("dev")
    tokens = [_id("tok") for _ in range(8)]

    await asyncio.gather(*(store.register(db, user, _reg(t, dev)) for t in tokens))

    active = await store.devices(db, user)
    assert len(active) == 1
    assert active[0].token in tokens
