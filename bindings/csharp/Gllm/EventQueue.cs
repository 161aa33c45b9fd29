// Moves events from the network thread to the game's thread. Game engines allow scene changes only on
// their main thread, so every event and every Task completion of the client is raised there: through the
// SynchronizationContext that was current when the client was created (Unity and Godot .NET install one on
// their main thread), or, where there is none, from Poll(), which the game calls once per frame.
using System;
using System.Collections.Generic;
using System.Threading;

namespace Gllm
{
    internal sealed class EventQueue
    {
        readonly SynchronizationContext context;
        readonly Queue<Action> queue = new Queue<Action>();
        static readonly SendOrPostCallback RunAction = state => ((Action)state)();

        public EventQueue(SynchronizationContext context) { this.context = context; }

        /// <summary>True when events wait for Poll() instead of going through a SynchronizationContext.</summary>
        public bool NeedsPolling { get { return context == null; } }

        /// <summary>From any thread: run <paramref name="action"/> on the game's thread, after those posted before.</summary>
        public void Post(Action action)
        {
            if (context != null)
            {
                context.Post(RunAction, action);
                return;
            }
            lock (queue) queue.Enqueue(action);
        }

        /// <summary>Runs the events queued so far; returns how many ran. An exception from a handler propagates,
        /// and the events after it stay queued for the next call.</summary>
        public int Poll()
        {
            int count;
            lock (queue) count = queue.Count;
            for (int i = 0; i < count; i++)
            {
                Action next;
                lock (queue)
                {
                    if (queue.Count == 0) return i;
                    next = queue.Dequeue();
                }
                next();
            }
            return count;
        }
    }
}
