# The oracle of pair 2's seed 1 trained 50 epochs instead of 25: does it still rise? (not part of bench_adapt)
set -e
D="--gta5-root runs/adapt_pair2/data/gta5 --cityscapes-root runs/adapt_pair2/data/cityscapes --size 256x128 --amp bf16 --cache"
O=runs/oracle_long/oracle50_seed1
python train_seg.py --model deeplab $D --channels-last --backbone resnet18 --weights none --seed 1 --resume --train-on cityscapes --out $O --epochs 50 > $O.log 2>&1
for s in val test; do python evaluate.py --checkpoint $O/last.pt $D --split $s --json $O.$s.json > $O.$s.json.log 2>&1; done
