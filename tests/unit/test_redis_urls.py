import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from core.redisconn import connect


async def test_every_url_kind_gets_its_client_without_connecting():
    plain = connect("redis://127.0.0.1:1/3")
    assert isinstance(plain, aioredis.Redis) and plain.connection_pool.connection_kwargs["db"] == 3
    sentinel = connect("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/2")
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert sentinel.connection_pool.service_name == "mymaster"
    cluster = connect("redis+cluster://127.0.0.1:7000")
    assert isinstance(cluster, RedisCluster)
    for c in (plain, sentinel):
        await c.aclose()


def test_sentinel_url_needs_a_master_name():
    with pytest.raises(ValueError, match="master name"):
        connect("redis+sentinel://10.0.0.1:26379")
