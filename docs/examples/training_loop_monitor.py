"""A custom training loop with RepresentationMonitor: layer CKA / PCA of the model being fine-tuned against its base.

A tiny Llama built from a config and random tokens stand in for a real model and data.
Run: python docs/examples/training_loop_monitor.py
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from repforget_kernels import RepresentationMonitor

torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config)


def batch(size=8, length=24):
    ids = torch.randint(0, config.vocab_size, (size, length))
    mask = torch.ones_like(ids)
    mask[: size // 2, length // 2:] = 0  # half the sequences right-padded
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


probe = [batch() for _ in range(2)]  # fixed probe batches, as a tokenizer returns them
# the reference statistics are taken now, before training changes the model (here: the base itself)
monitor = RepresentationMonitor(model, probe, every=10, token_cka=True)

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
model.train()
for step in range(1, 31):
    loss = model(**batch()).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scalars = monitor.step(model, step)  # None except on steps 10, 20, 30
    if scalars:
        print(f"step {step:3d}  loss {loss.item():.3f}  cka mean {scalars['repr/cka/mean']:.3f}  "
              f"token cka mean {scalars['repr/cka_tokens/mean']:.3f}  "
              f"pca similarity mean {scalars['repr/pca_similarity/mean']:.3f}  "
              f"last layer cka {scalars['repr/cka/layer_3']:.3f}")
print("the latest comparison, per layer:", monitor.last.to_dict()["layers"][-1])
