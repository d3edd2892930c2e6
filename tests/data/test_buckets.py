from finetune_core.data.buckets import closest_bucket, make_buckets, own_size, target_size


def test_buckets_are_multiples_of_64_within_area():
    buckets = make_buckets(512, 512)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 4
        assert (h, w) in buckets
    assert len(buckets) > 5


def test_closest_bucket_follows_aspect():
    buckets = make_buckets(512, 512)
    assert closest_bucket((1000, 1000), buckets) == (512, 512)
    wide = closest_bucket((1600, 900), buckets)
    tall = closest_bucket((900, 1600), buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])


def test_modes():
    assert own_size((100, 30)) == (128, 64)
    assert target_size("none", (200, 260), (512, 512)) == (192, 256)
    assert target_size("fixed", (200, 260), (512, 512)) == (512, 512)
    assert target_size("buckets", (200, 400), (512, 512)) == closest_bucket((200, 400), make_buckets(512, 512))
