"""Preprocessing: an ImageNet-style folder -> the subset CSV, the latent and DINO caches and the CLIP table.

    python -m repa_fast.preprocessing.sample_subset --imagenet-dir TRAIN --samples-per-class 200 \
        --class-index imagenet_class_index.json --output-csv train_200k.csv
    python -m repa_fast.preprocessing.encode_vae_latents --csv-path train_200k.csv --vae SD15_DIR \
        --output-dir vae_latents
    python -m repa_fast.preprocessing.build_dino_cache --csv-path train_200k.csv --dino DINOV2_DIR \
        --layers mid --output-dir dino_tokens
    python -m repa_fast.preprocessing.prepare_clip_embeddings --class-names imagenet_class_index.json \
        --clip SD15_DIR --output-path clip_embeddings_1001.pt

(console scripts: repa-fast-sample-subset, repa-fast-encode-vae, repa-fast-build-dino, repa-fast-prepare-clip.)

The two image encoders are resumable (ids already in the cache are skipped before their image is
opened) and shardable: ``--shard i/n`` takes rows ``i::n`` of the CSV, and every shard writes into the
same LMDB (lmdb serialises the writers with its lock file; use a local disk, not NFS). One process
per GPU:

    for i in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$i python -m repa_fast.preprocessing.build_dino_cache ... --shard $i/4 &
    done; wait

The shards together write the same keys and bytes as one unsharded run with the same --batch-size
(batched CPU convolutions can differ in the last bit between batch sizes).
"""
