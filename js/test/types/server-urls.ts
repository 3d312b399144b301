// `Syncline.connect` takes one URL, a list (mutable or readonly), or none.
import { Syncline, type ServerUrls } from 'syncline';

export async function lists(token: string): Promise<Syncline[]> {
  const fromConfig: string[] = ['wss://a.example.com/sync', 'wss://b.example.com/sync'];
  const fixed = ['wss://a.example.com/sync', 'wss://b.example.com/sync'] as const;
  const either: ServerUrls = Math.random() < 0.5 ? fixed : 'wss://a.example.com/sync';
  return [
    await Syncline.connect(fromConfig, { token }),
    await Syncline.connect(fixed, { token }),
    await Syncline.connect(either),
    await Syncline.connect('wss://a.example.com/sync'),
    await Syncline.connect(null),
    await Syncline.connect(),
  ];
}
